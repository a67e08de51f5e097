"""The adapter pool: adapters come from the registry on first use and stay resident while they fit.

Three tiers: the *device* tier (installed in the model's multi-adapter stacks, bounded by
``capacity_bytes``, rank padding included: see :meth:`AdapterPool.footprint`), the *host* tier (prepared
tensors in CPU memory, bounded by ``host_bytes``) and the registry on disk. Both caches evict
least-recently-used first; pinned adapters are never evicted from the device. Eviction only moves bytes:
an adapter reloaded later is the same bytes, so answers never change.

A *composition* (``a@1*0.7+b@2*0.3``, :mod:`adapterhub_local.compose.request`) is one more entry: built once
from its parents' prepared pairs (rank-concatenated, the weights folded in: the stored ``cat`` combination's
operands) and then cached, bounded and evicted like any adapter, under its canonical spelling and checked by
its content hash (the parents' content hashes and weights), so a changed parent is never served stale.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from adapterhub_local.compose.request import Composition, build, resolve_composition
from adapterhub_local.compose.spec import is_composition
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference.adapters import PreparedAdapter, prepare, refuse_non_finite
from adapterhub_local.inference.rows import RowLedger
from adapterhub_local.inference.types import PoolStats
from adapterhub_local.inference.usage import UsageLedger
from adapterhub_local.registry.store import Registry

log = logging.getLogger("adapterhub_local.inference")
MAX_COMPOSITIONS = 1024
"""Resolved compositions remembered (beyond those resident); older ones are resolved again when next asked."""


class Installer(Protocol):
    """What the pool drives: put an adapter's tensors on the device in a slot, and take them off."""

    def install(self, slot: int, adapter: PreparedAdapter) -> None: ...

    def uninstall(self, slot: int, adapter: PreparedAdapter) -> None: ...

    def stack_bytes(self) -> int: ...


class AdapterPool:
    """LRU-by-bytes pool of adapters over the registry. Slot 0 is reserved for "no adapter"."""

    def __init__(self, registry: Registry, base: str, model: nn.Module, installer: Installer, capacity_bytes: int,
                 host_bytes: int, dtype: torch.dtype) -> None:
        self.registry = registry
        self.base = base
        self.model = model
        self.installer = installer
        self.capacity_bytes = int(capacity_bytes)
        self.host_bytes = int(host_bytes)
        self.dtype = dtype
        self.device: OrderedDict[str, tuple[int, PreparedAdapter]] = OrderedDict()  # ref -> (slot, adapter)
        self.host: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self.pinned: set[str] = set()
        self.rows = RowLedger()
        """Rows of open decode batches and the adapters they hold busy: never evicted, counted like pinned."""
        self._free: list[int] = []
        self._next_slot = 1
        self.stats = PoolStats(capacity_bytes=self.capacity_bytes)
        self._content: dict[str, str] = {}  # ref -> content hash (AdapterCard.content_hash) cached under it
        self._fresh: set[str] = set()  # loaded from disk and not installed since (not a host hit)
        self.loader: Callable[[str], PreparedAdapter] = self._load_from_registry
        self._compositions: OrderedDict[str, Composition] = OrderedDict()  # canonical spelling -> resolved parts
        self.usage = UsageLedger()
        """Per-adapter load latency here; the engine adds merges, the server rows and tokens."""

    @property
    def busy(self) -> dict[str, int]:
        """A copy: adapter → live rows holding it (see :class:`RowLedger`)."""
        return self.rows.busy_counts()

    # ----------------------------------------------------------- host tier
    def resolve(self, ref: str) -> str:
        """Canonical ``name@version`` for a reference (``name`` follows the latest version, a tag its current
        target). Resolved against the registry every time, and checked against what is cached: entries carry
        their content hash (``AdapterCard.content_hash``), so if the bytes behind ``name@N`` ever changed (a
        damaged or re-created version) the stale copy is dropped here and the new bytes load on use."""
        if is_composition(ref):
            composition = resolve_composition(self.registry, ref, self.base)
            card, canonical = composition.card, composition.key
            self._remember(composition)
        else:
            card = self.registry.resolve(ref)
            canonical = card.ref
        cached = self._content.get(canonical)
        if cached is not None and cached != card.content_hash:
            self._drop_stale(canonical)
        return canonical

    def _remember(self, composition: Composition) -> None:
        self._compositions[composition.key] = composition
        self._compositions.move_to_end(composition.key)
        for key in list(self._compositions)[: max(0, len(self._compositions) - MAX_COMPOSITIONS)]:
            if key not in self.device and key not in self.host:
                del self._compositions[key]

    def _drop_stale(self, ref: str) -> None:
        rows = self.rows.busy(ref)
        if rows:
            raise UnsupportedError(f"adapter {ref} changed in the registry while {rows} live row(s) still use "
                                   "its previous weights", "retry once those generations finish")
        pinned = ref in self.pinned
        log.warning("adapter %s changed in the registry; dropping the cached copy", ref)
        self.evict(ref)
        self.host.pop(ref, None)
        self._content.pop(ref, None)
        self._refresh()
        if pinned:  # still pinned: bring the new bytes in now
            self.acquire([ref])

    def _load_from_registry(self, ref: str) -> PreparedAdapter:
        composition = self._compositions.get(ref)
        if composition is not None:
            return self._compose(composition)
        loaded = self.registry.load_adapter(ref, base=self.base)
        return prepare(loaded, self.model, self.dtype)

    def _compose(self, composition: Composition) -> PreparedAdapter:
        """A composition's operands, built once from its parents (loaded through this pool's own tiers)."""
        parents = [self.get(card.ref) for card in composition.parents]
        for parent in parents:
            if parent.is_dora:
                raise UnsupportedError(f"{parent.ref} in {composition.key!r} uses DoRA: its magnitude rescales the "
                                       "whole weight, so a DoRA delta does not add up with others",
                                       "serve the DoRA adapter on its own, or compose plain LoRA adapters")
            if not parent.extras.empty:
                raise UnsupportedError(f"{parent.ref} in {composition.key} has an embedding LoRA, trainable tokens or "
                                       "a module copy; composition adds LoRA pairs only",
                                       "compose adapters whose LoRA is on linear layers only")
        if len({p.fan_in_fan_out for p in parents}) > 1:
            raise UnsupportedError(f"{composition.key}: the parents store their weights transposed differently",
                                   "compose adapters saved with the same fan_in_fan_out")
        pairs = build([p.pairs for p in parents], composition.weights)
        adapter = PreparedAdapter(ref=composition.key, card=composition.card, kind="lora", pairs=pairs,
                                  fan_in_fan_out=parents[0].fan_in_fan_out, dtype=self.dtype)
        return refuse_non_finite(adapter)

    def get(self, ref: str) -> PreparedAdapter:
        """The prepared adapter, from the device or host tier or (a miss) from disk."""
        if ref in self.device:
            return self.device[ref][1]
        if ref in self.host:
            self.host.move_to_end(ref)
            return self.host[ref]
        start = time.perf_counter()
        adapter = self.loader(ref)
        self.usage.loaded(ref, time.perf_counter() - start)
        self._content[ref] = adapter.card.content_hash
        self.stats.misses += 1
        self._fresh.add(ref)
        self._keep_on_host(adapter)
        return adapter

    def _keep_on_host(self, adapter: PreparedAdapter) -> None:
        self.host[adapter.ref] = adapter
        self.host.move_to_end(adapter.ref)
        while self._host_used() > self.host_bytes and len(self.host) > 1:
            ref, _ = self.host.popitem(last=False)
            log.debug("host cache dropped %s", ref)
        self._refresh()

    def _host_used(self) -> int:
        return sum(a.nbytes for a in self.host.values())

    # --------------------------------------------------------- device tier
    def nbytes(self, ref: str) -> int:
        """The adapter's own bytes (unpadded)."""
        return self.get(ref).nbytes

    def footprint(self, refs: set[str]) -> int:
        """Device bytes these adapters take together, padding included: every wrapped module stores each adapter
        that targets it at the largest rank among them (the multi-adapter stacks are rank-padded), so a rank-256
        adapter makes every rank-16 adapter sharing its modules cost 256 ranks there. Soft prompts and heads
        count their own bytes."""
        element = torch.empty((), dtype=self.dtype).element_size()
        ranks: dict[str, list[int]] = {}
        width: dict[str, int] = {}
        other = 0
        for ref in refs:
            adapter = self.get(ref)
            stacked = [*adapter.pairs.items(), *adapter.extras.embeddings.items()]  # rank-padded per module
            for name, pair in stacked:
                ranks.setdefault(name, []).append(pair.rank)
                width[name] = int(pair.a.shape[1] + pair.b.shape[0])  # d_in + d_out; an embedding: V + d
            other += adapter.nbytes - element * sum(p.a.numel() + p.b.numel() for _, p in stacked)
        return other + element * sum(len(r) * max(r) * width[name] for name, r in ranks.items())

    def fits_together(self, refs: set[str]) -> bool:
        """Whether these adapters (plus every pinned or busy one) fit on the device at once, padding included."""
        return self.footprint(refs | self.pinned | set(self.rows.busy_counts())) <= self.capacity_bytes

    def acquire(self, refs: list[str]) -> dict[str, int]:
        """Make every adapter in ``refs`` resident at once; returns ref → global slot."""
        wanted = list(dict.fromkeys(refs))
        if not self.fits_together(set(wanted)):
            raise UnsupportedError(
                f"adapters {wanted} do not fit the pool ({self.capacity_bytes} bytes, pinned: {sorted(self.pinned)})",
                "raise pool_bytes, unpin adapters, or send fewer adapters per batch")
        slots: dict[str, int] = {}
        for ref in wanted:
            if ref in self.device:
                self.stats.hits += 1
                self.device.move_to_end(ref)
                slots[ref] = self.device[ref][0]
                continue
            adapter = self.get(ref)
            if ref in self._fresh:
                self._fresh.discard(ref)
            else:
                self.stats.host_hits += 1
            self._make_room(ref, keep=set(wanted))
            slot = self._free.pop() if self._free else self._take_slot()
            self.installer.install(slot, adapter)
            self.device[ref] = (slot, adapter)
            slots[ref] = slot
        self._refresh()
        return slots

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _device_used(self) -> int:
        return self.footprint(set(self.device))

    def _make_room(self, incoming: str, keep: set[str]) -> None:
        """Evict least-recently-used adapters until ``incoming`` fits beside the rest, padding included."""
        for ref in list(self.device):
            if self.footprint({*self.device, incoming}) <= self.capacity_bytes:
                return
            if ref in keep or ref in self.pinned or self.rows.busy(ref):
                continue
            self.evict(ref)

    def evict(self, ref: str) -> None:
        """Take an adapter off the device (it stays in the host cache while that has room)."""
        entry = self.device.pop(ref, None)
        if entry is None:
            return
        slot, adapter = entry
        self.installer.uninstall(slot, adapter)
        self._free.append(slot)
        self.stats.evictions += 1
        self._keep_on_host(adapter)
        log.debug("evicted %s from slot %d", ref, slot)

    def unload(self, ref: str) -> None:
        """Drop an adapter from every tier (and unpin it)."""
        self.pinned.discard(ref)
        self.evict(ref)
        self.host.pop(ref, None)
        self._content.pop(ref, None)
        self._refresh()

    def pin(self, ref: str) -> None:
        """Keep an adapter on the device until unpinned (loads it now)."""
        if not self.fits_together({ref}):
            raise UnsupportedError(f"pinning {ref} would exceed the pool ({self.capacity_bytes} bytes)",
                                   "raise pool_bytes or unpin another adapter")
        self.pinned.add(ref)
        self.acquire([ref])

    def unpin(self, ref: str) -> None:
        self.pinned.discard(ref)

    def tier(self, ref: str) -> str:
        return "device" if ref in self.device else "host" if ref in self.host else "disk"

    def _refresh(self) -> None:
        self.stats.resident = len(self.device)
        self.stats.resident_bytes = self._device_used()
        self.stats.stack_bytes = self.installer.stack_bytes()
        self.stats.host_resident = len(self.host)
        self.stats.host_bytes = self._host_used()
