"""The inference engine: one frozen base, any registered adapter per request, in merge, swap or auto mode.

Public API (stable; the CLI and the HTTP server use only this)::

    engine = Engine(registry, "tiny", mode="swap", pool_bytes=256 << 20, device="cpu")
    engine.generate([Request("Hello", adapter="e2e@2", sampling=SamplingParams(max_new_tokens=32))])
    for event in engine.generate_stream(requests): ...
    engine.classify([Request("a fine film", adapter="sentiment")])
    engine.logits(requests)
    engine.load(ref, pin=True); engine.unload(ref); engine.pin(ref); engine.unpin(ref); engine.adapters()
    engine.set_mode("merge" | "swap" | "auto"); engine.merge(ref); engine.unmerge()
    engine.stats(); engine.context_length; engine.count_tokens(request)
    batch = engine.open_batch(); batch.join(requests, keys); batch.step(); batch.leave(key)   # continuous batching

Every public method takes the engine's lock, so it is safe to call from one scheduler thread while other
threads read ``stats()``; a stream holds the lock until it is exhausted or closed.

In swap mode a batch may mix any adapters (LoRA of any rank and targets, soft prompts, no adapter);
batches whose adapters do not fit the pool together are split into chunks that do. In merge mode requests
are grouped by adapter and each group runs with its adapter merged into the weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator
from typing import Literal

import torch

from adapterhub_local.errors import ConfigError, UnsupportedError
from adapterhub_local.inference.adapters import PreparedAdapter
from adapterhub_local.inference.continuous import OpenBatch, editable_cache
from adapterhub_local.inference.generation import RowState, decode
from adapterhub_local.inference.merge import refuse_prompt
from adapterhub_local.inference.model_state import EngineModel
from adapterhub_local.inference.policy import AutoPolicy
from adapterhub_local.inference.pool import AdapterPool
from adapterhub_local.inference.sampling import check
from adapterhub_local.inference.slab_rows import SlabRows
from adapterhub_local.inference.static_decode import (
    CudaGraphs,
    StaticDecoder,
    resolve_continuous,
    resolve_decoder,
)
from adapterhub_local.inference.types import (
    AdapterInfo,
    ClassificationResult,
    GenerationResult,
    LogitsResult,
    PoolStats,
    Request,
    RowFailedError,
    SamplingParams,
    StreamEvent,
)
from adapterhub_local.inference.usage import DEFAULT_TOP_K, UsageLedger, UsageReport
from adapterhub_local.registry.store import Registry

__all__ = ["ClassificationResult", "Engine", "GenerationResult", "LogitsResult", "Mode", "OpenBatch", "PoolStats",
           "Request", "SamplingParams", "StreamEvent"]

log = logging.getLogger("adapterhub_local.inference")
Mode = Literal["swap", "merge", "auto"]
MODES = ("swap", "merge", "auto")


class Engine:
    """Serve one registered base with per-request adapters.

    Args:
        registry: where bases and adapters live.
        base: the registered base's name.
        mode: ``swap`` (per-row adapters, base weights untouched), ``merge`` (one adapter merged at a time)
            or ``auto`` (see :class:`AutoPolicy`).
        pool_bytes: device budget for resident adapters (LRU by bytes; pinned ones stay).
        host_bytes: CPU cache budget for adapters evicted from the device (default ``4 × pool_bytes``).
        device: torch device for the model and adapters.
        dtype: model dtype (fp32 by default; bf16 on GPUs).
        policy: the auto-mode policy (default :class:`AutoPolicy()`).
        lora_strategy: the multi-adapter op: ``gather`` (per-row BGMV), ``dense`` (batch adapters concatenated,
            masked per row) or ``auto`` (dense on GPUs, gather on CPUs); see :mod:`multi_lora`.
        decoder: how batches decode: ``dynamic`` (transformers' growing cache), ``static`` (a preallocated
            cache and fixed-shape step), ``graph`` (``static`` with the step captured as a CUDA graph) or
            ``auto`` (``graph`` on CUDA where the base allows, else ``dynamic``); see :mod:`static_decode`.
            Open batches (continuous batching, the server's default path) follow :attr:`continuous_decoder`:
            under ``auto`` a static slab wherever the base supports a static cache (``graph`` on CUDA,
            ``static`` on CPUs; :mod:`slab_rows`), the growing cache only where it does not.
    """

    def __init__(self, registry: Registry, base: str, mode: Mode = "swap", pool_bytes: int = 256 << 20,
                 host_bytes: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, policy: AutoPolicy | None = None,
                 lora_strategy: str = "auto", decoder: str = "auto") -> None:
        if mode not in MODES:
            raise ConfigError([f"mode {mode!r} is not one of {', '.join(MODES)}"], "pick swap, merge or auto",
                              what="engine options")
        self.registry = registry
        self.base = registry.base(base)
        self.device = torch.device(device)
        self.dtype = dtype
        self.runner = EngineModel(self.base, self.device, dtype, lora_strategy)
        self.pool = AdapterPool(registry, self.base.name, self.runner.model, self.runner, pool_bytes,
                                host_bytes if host_bytes is not None else 4 * pool_bytes, dtype)
        self.merger = self.runner.merger  # one merger: DoRA installs read its clean weights
        self.decoder = resolve_decoder(decoder, self.device, self.runner.model) if self.runner.is_causal else "dynamic"
        self._static: StaticDecoder | None = None
        self.continuous_decoder = (resolve_continuous(decoder, self.device, self.runner.model)
                                   if self.runner.is_causal else "dynamic")
        """How open batches (continuous batching) decode: ``static``/``graph`` on a slab
        (:mod:`slab_rows`), or ``dynamic`` where the base cannot use a static cache."""
        self._slab: SlabRows | None = None
        self.policy = policy or AutoPolicy()
        self.mode: Mode = mode
        self.switches = 0
        self.last_switch_s = 0.0
        self._editable_cache: bool | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- facts
    @property
    def base_name(self) -> str:
        return self.base.name

    @property
    def context_length(self) -> int:
        """The base's maximum sequence length (prompt + virtual tokens + new tokens)."""
        return self.runner.context_length

    @property
    def tokenizer(self) -> object:
        return self.runner.tokenizer

    @property
    def packed_weight_bytes(self) -> int:
        """Memory of the base linears' prepacked bf16 copies (CPU bf16 only; see :mod:`packed_linear`)."""
        return self.runner.packed_weight_bytes

    @property
    def can_generate(self) -> bool:
        return self.runner.is_causal

    @property
    def open_rows(self) -> int:
        """Rows of open decode batches (:meth:`open_batch`) not yet released; merging waits until there are
        none (the pool's :class:`~adapterhub_local.inference.rows.RowLedger` owns the count)."""
        return self.pool.rows.open_rows

    def exclusive(self) -> threading.RLock:
        """The engine's lock, for a friend that runs several engine steps as one (the open batch): hold it
        while touching the model, the pool or the batch context."""
        return self._lock

    @property
    def merged(self) -> str | None:
        """The adapter merged into the weights now, if any."""
        return self.merger.merged_ref

    def count_tokens(self, request: Request) -> int:
        """Tokens the request occupies before generation (prompt + the adapter's virtual tokens)."""
        with self._lock:
            ids = self.runner.encode(request)
            virtual = 0
            if request.adapter is not None:
                adapter = self.pool.get(self.pool.resolve(request.adapter))
                virtual = 0 if adapter.prompt is None else int(adapter.prompt.shape[0])
            return len(ids) + virtual

    # ------------------------------------------------------------- adapters
    def load(self, ref: str, pin: bool = False) -> AdapterInfo:
        """Bring an adapter onto the device now (optionally pinned); returns its info."""
        with self._lock:
            canonical = self.pool.resolve(ref)
            if pin:
                self.pool.pin(canonical)
            else:
                self.pool.acquire([canonical])
            return self._info(canonical)

    def unload(self, ref: str) -> None:
        """Drop an adapter from the device and host caches (unmerging it first if merged)."""
        with self._lock:
            canonical = self.pool.resolve(ref)
            if self.pool.rows.busy(canonical):
                raise UnsupportedError(f"adapter {canonical} is in use by {self.pool.rows.busy(canonical)} live row(s)",
                                       "unload it once their generations finish")
            if self.merged == canonical:
                self._set_merged(None)
            self.pool.unload(canonical)

    def pin(self, ref: str) -> AdapterInfo:
        return self.load(ref, pin=True)

    def unpin(self, ref: str) -> None:
        with self._lock:
            self.pool.unpin(self.pool.resolve(ref))

    def adapters(self) -> list[AdapterInfo]:
        """Adapters in the device and host tiers (most recently used last)."""
        with self._lock:
            refs = list(dict.fromkeys([*self.pool.host, *self.pool.device]))
            return [self._info(r) for r in refs]

    def _info(self, ref: str) -> AdapterInfo:
        adapter = self.pool.get(ref)
        head = adapter.head
        return AdapterInfo(ref=ref, kind=adapter.kind, task_type=adapter.card.task_type, rank=adapter.rank,
                           bytes=adapter.nbytes, pinned=ref in self.pool.pinned, tier=self.pool.tier(ref),
                           labels=None if head is None else list(head.labels))

    def stats(self) -> PoolStats:
        """A copy of the pool counters (lock-free: safe to call from a metrics thread during generation)."""
        return PoolStats(**vars(self.pool.stats))

    @property
    def usage(self) -> UsageLedger:
        """Per-adapter counters: loads (the pool), merges (here), rows and tokens (whoever serves: the server
        records them with :meth:`UsageLedger.served`)."""
        return self.pool.usage

    def usage_report(self, top_k: int = DEFAULT_TOP_K) -> UsageReport:
        """The ``top_k`` adapters by traffic (each with its residency now) plus an ``other`` entry; lock-free like
        :meth:`stats`."""
        return self.pool.usage.report(top_k, self.pool.tier)

    # ----------------------------------------------------------------- modes
    def set_mode(self, mode: Mode) -> None:
        """Switch mode; leaving merge/auto for swap unmerges."""
        if mode not in MODES:
            raise ConfigError([f"mode {mode!r} is not one of {', '.join(MODES)}"], "pick swap, merge or auto",
                              what="engine options")
        with self._lock:
            if mode == "swap":
                self._set_merged(None)
            self.mode = mode
            log.info("engine mode: %s", mode)

    def merge(self, ref: str) -> float:
        """Merge ``ref`` into the weights now (merge mode); returns the switch time in seconds."""
        with self._lock:
            seconds = self._set_merged(self.pool.resolve(ref))
            if self.mode == "swap":
                self.mode = "merge"
            return seconds

    def unmerge(self) -> None:
        """Restore the base weights bit for bit."""
        with self._lock:
            self._set_merged(None)

    def _set_merged(self, ref: str | None) -> float:
        if ref == self.merged:
            return 0.0
        if self.open_rows:
            raise UnsupportedError(f"cannot change the merged adapter while {self.open_rows} row(s) decode in an "
                                   "open batch", "wait for the open batch to empty")
        start = time.perf_counter()
        if ref is None:
            self.merger.unmerge()
        else:
            adapter = self.pool.get(ref)
            refuse_prompt(adapter)
            self.merger.merge(adapter)
            self.usage.merged(ref)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_switch_s = time.perf_counter() - start
        self.switches += 1
        log.info("merge switch to %s in %.1f ms", ref or "base", 1e3 * self.last_switch_s)
        return self.last_switch_s

    # ------------------------------------------------------------- planning
    def resolve_refs(self, requests: list[Request]) -> list[str | None]:
        """Check every request (raising the project's errors for caller mistakes) and return each one's
        canonical adapter ref (``None``: the bare base). A merged adapter whose bytes changed in the registry is
        unmerged here, so a reused or retagged name never serves stale weights."""
        if not isinstance(requests, list) or any(not isinstance(r, Request) for r in requests):
            raise UnsupportedError("requests must be a list of Request objects", "wrap each prompt in Request(...)")
        for i, request in enumerate(requests):
            check(request.sampling)
            if request.sampling.stop and self.runner.tokenizer is None:
                raise UnsupportedError(f"base {self.base.name!r} has no tokenizer, so stop strings cannot be seen",
                                       "register the base with its tokenizer or drop the stop strings")
            self.runner.check_prompt(request, f"request {i}")
        memo: dict[str, str] = {}
        refs: list[str | None] = []
        for request in requests:
            if request.adapter is None:
                refs.append(None)
                continue
            if request.adapter not in memo:
                memo[request.adapter] = self.pool.resolve(request.adapter)
            refs.append(memo[request.adapter])
        merged = self.merger.merged
        if merged is not None and merged.ref in memo.values() and \
                self.pool.get(merged.ref).card.content_hash != merged.card.content_hash:
            self._set_merged(None)
        return refs

    def _groups(self, refs: list[str | None]) -> list[tuple[list[int], str | None]]:
        """Row groups to run, each with the adapter to merge (``None`` = swap path on clean weights)."""
        rows = list(range(len(refs)))
        if self.mode == "auto":
            self.policy.observe(refs)
            mergeable = {r for r in set(refs) if r is not None and self.pool.get(r).kind == "lora"}
            target = self.policy.decide(mergeable)
            if target is not None and all(r == target for r in refs):
                return [(rows, target)]
            return self._fit(rows, refs)
        if self.mode == "merge":
            groups: dict[str | None, list[int]] = {}
            for i, ref in enumerate(refs):
                if ref is not None:
                    refuse_prompt(self.pool.get(ref))
                groups.setdefault(ref, []).append(i)
            if self.merged in groups:  # the merged adapter first: no switch for it
                groups = {self.merged: groups.pop(self.merged), **groups}
            return [(idx, ref) for ref, idx in groups.items()]
        return self._fit(rows, refs)

    def _fit(self, rows: list[int], refs: list[str | None]) -> list[tuple[list[int], str | None]]:
        """Split rows into chunks whose adapters fit the pool together (swap path)."""
        chunks: list[tuple[list[int], str | None]] = []
        current: list[int] = []
        held: set[str] = set()
        for i in rows:
            ref = refs[i]
            if ref is not None and ref not in held and not self.pool.fits_together(held | {ref}):
                if not self.pool.fits_together({ref}):
                    raise UnsupportedError(f"adapter {ref} ({self.pool.footprint({ref})} bytes) is larger than the "
                                           f"pool ({self.pool.capacity_bytes} bytes)", "raise pool_bytes")
                chunks.append((current, None))
                current, held = [], set()
            current.append(i)
            if ref is not None:
                held.add(ref)
        if current:
            chunks.append((current, None))
        return chunks

    def _adapters_for(self, refs: list[str | None],
                      merged: str | None) -> tuple[list[int], list[PreparedAdapter | None]]:
        """Put the rows' adapters in place; returns per-row global slots and prepared adapters."""
        self._set_merged(merged)
        if merged is not None:
            adapter = self.pool.get(merged)
            return [0] * len(refs), [adapter] * len(refs)
        lora = [r for r in refs if r is not None and self.pool.get(r).kind == "lora"]
        slots = self.pool.acquire(lora) if lora else {}
        prompt_refs = {r for r in refs if r is not None and r not in slots}
        adapters = {r: self.pool.get(r) for r in {*slots, *prompt_refs}}
        return [slots.get(r, 0) if r is not None else 0 for r in refs], [None if r is None else adapters[r]
                                                                         for r in refs]

    # ------------------------------------------------------------ generation
    @property
    def static_decoder(self) -> StaticDecoder:
        """The fixed-shape decoder (built on first use; ``decoder`` is ``static`` or ``graph``)."""
        if self._static is None:
            graphs = CudaGraphs(self.device) if self.decoder == "graph" else None
            self._static = StaticDecoder(self.runner.model, self.runner.context, graphs)
        return self._static

    @static_decoder.setter
    def static_decoder(self, decoder: StaticDecoder) -> None:
        """Use this fixed-shape decoder (e.g. with another graph backend) for every later batch."""
        with self._lock:
            self._static = decoder
            self.decoder = "static" if decoder.graphs is None else "graph"

    @property
    def can_open_batch(self) -> bool:
        """Whether :meth:`open_batch` works now: a decoder base whose KV cache rows can be edited, with nothing
        merged, in swap mode or in auto mode while the policy chooses swapping (the scheduler batches
        continuously only then; when auto traffic concentrates on one adapter this turns false, the open batch
        drains and the scheduler's next batches run merged)."""
        if not self.runner.is_causal or self.merged is not None or self.mode == "merge":
            return False
        if self.mode == "auto" and self.policy.decision is not None:
            return False
        if self._editable_cache is None:
            with self._lock:
                self.runner.context.clear()  # a plain base forward
                self._editable_cache = editable_cache(self.runner.model, self.runner.pad_id, self.device)
        return self._editable_cache

    def open_batch(self, max_rows: int = 64, max_wait_steps: int = 3, fuse_budget: int = 32) -> OpenBatch:
        """A decode batch that rows join and leave between steps (continuous batching, swap mode); see
        :class:`adapterhub_local.inference.continuous.OpenBatch` for the options."""
        return OpenBatch(self, max_rows, max_wait_steps, fuse_budget, slab=self._free_slab())

    def _free_slab(self) -> SlabRows | None:
        """The engine's static slab for a new open batch (kept across batches, so a server's CUDA graph is
        captured once), a fresh one while another batch holds it, or ``None`` in dynamic mode."""
        if self.continuous_decoder == "dynamic":
            return None
        with self._lock:
            if self._slab is None or self._slab.holder is not None:
                graphs = CudaGraphs(self.device) if self.continuous_decoder == "graph" else None
                slab = SlabRows(self.runner.model, self.runner.context, graphs, self.context_length)
                if self._slab is None:
                    self._slab = slab
                return slab
            return self._slab

    def generate(self, requests: list[Request]) -> list[GenerationResult]:
        """Generate for every request (one batch, or chunks/groups as the mode and pool require). Raises the
        first row's :class:`RowFailedError` if a row failed (the stream API reports it per row instead)."""
        results: list[GenerationResult | None] = [None] * len(requests)
        events = self.generate_stream(requests)
        try:
            for event in events:
                if event.error is not None:
                    raise event.error
                if event.finished:
                    results[event.index] = event.result
        finally:
            events.close()
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def generate_stream(self, requests: list[Request]) -> Generator[StreamEvent, None, None]:
        """Stream new text per request as it is generated; each request ends with a ``finished`` event."""
        with self._lock:
            if not self.runner.is_causal:
                raise UnsupportedError(f"base {self.base.name!r} is an encoder; it cannot generate text",
                                       "use classify() or a decoder base")
            refs = self.resolve_refs(requests)
            for rows, merged in self._groups(refs):
                yield from self._generate_rows(requests, refs, rows, merged)

    def _generate_rows(self, requests: list[Request], refs: list[str | None], rows: list[int],
                       merged: str | None) -> Iterator[StreamEvent]:
        sub_refs = [refs[i] for i in rows]
        slots, adapters = self._adapters_for(sub_refs, merged)
        ids = [self.runner.encode(requests[i]) for i in rows]
        prompts = [None if merged is not None or a is None else a.prompt for a in adapters]
        batch = self.runner.batch(ids, prompts, slots)
        states = []
        for k, i in enumerate(rows):
            used = batch.virtual[k] + len(ids[k])
            room = self.context_length - used
            if room < 1:
                raise UnsupportedError(f"request {i} needs {used} tokens; the context holds {self.context_length}",
                                       "shorten the prompt")
            params = requests[i].sampling
            states.append(RowState(params=params, prompt_ids=ids[k], limit=min(params.max_new_tokens, room)))
        tokenizer, eos = self.runner.tokenizer, self.runner.eos_ids
        if self.decoder == "dynamic":
            self.runner.context.set_rows(slots)
            steps = decode(self.runner.model, batch, states, tokenizer, eos)
        else:
            steps = self.static_decoder.decode(batch, states, slots, tokenizer, eos)
        try:
            for step in steps:
                for k, delta, token in step:
                    state = states[k]
                    if state.error is not None:
                        yield StreamEvent(index=rows[k], text="", token_ids=[], finished=True,
                                          error=RowFailedError(f"request {rows[k]}: {state.error}",
                                                               "retry; if it recurs, check the adapter's weights "
                                                               "with `adapterhub verify`"))
                        continue
                    result = None
                    if state.finished:
                        result = GenerationResult(text=state.text, token_ids=list(state.generated),
                                                  prompt_tokens=len(ids[k]), completion_tokens=len(state.generated),
                                                  finish_reason=state.finish_reason or "length", adapter=sub_refs[k])
                    if delta or result is not None or token is not None:
                        yield StreamEvent(index=rows[k], text=delta, token_ids=[] if token is None else [token],
                                          finished=result is not None, result=result)
        finally:
            steps.close()  # a stream closed early: the decoder restores the batch context now
            self.runner.context.clear()

    # --------------------------------------------------------------- logits
    def logits(self, requests: list[Request]) -> list[LogitsResult]:
        """Next-token logits at every prompt position of every request (causal LM bases)."""
        with self._lock:
            if not self.runner.is_causal:
                raise UnsupportedError(f"base {self.base.name!r} has no language-model head", "use classify()")
            refs = self.resolve_refs(requests)
            out: list[LogitsResult | None] = [None] * len(requests)
            for rows, merged in self._groups(refs):
                sub = [refs[i] for i in rows]
                slots, adapters = self._adapters_for(sub, merged)
                ids = [self.runner.encode(requests[i]) for i in rows]
                prompts = [None if merged is not None or a is None else a.prompt for a in adapters]
                for k, tensor in enumerate(self.runner.prompt_logits(ids, prompts, slots)):
                    out[rows[k]] = LogitsResult(tensor, sub[k])
            return [r for r in out if r is not None]

    # -------------------------------------------------------- classification
    def classify(self, requests: list[Request]) -> list[ClassificationResult]:
        """Labels and probabilities from classifier adapters (each request's adapter must carry a head)."""
        with self._lock:
            refs = self.resolve_refs(requests)
            for i, ref in enumerate(refs):
                adapter = None if ref is None else self.pool.get(ref)
                if adapter is None or adapter.head is None:
                    raise UnsupportedError(f"request {i}: adapter {ref or '(none)'} is not a classifier",
                                           "use a sequence_classification adapter (its card lists the labels)")
            out: list[ClassificationResult | None] = [None] * len(requests)
            for rows, merged in self._groups(refs):
                sub = [refs[i] for i in rows]
                slots, adapters = self._adapters_for(sub, merged)
                ids = [self.runner.encode(requests[i]) for i in rows]
                prompts = [None if merged is not None or a is None else a.prompt for a in adapters]
                heads = [a.head for a in adapters if a is not None and a.head is not None]
                for k, logits in enumerate(self.runner.classify(ids, prompts, slots, heads)):
                    head = heads[k]
                    probs = logits.softmax(-1).tolist()
                    best = max(range(len(probs)), key=probs.__getitem__)
                    out[rows[k]] = ClassificationResult(
                        label=head.labels[best], probabilities=dict(zip(head.labels, probs, strict=True)),
                        logits=logits.tolist(), adapter=sub[k])
            return [r for r in out if r is not None]
