"""Continuous batching on a static slab: rows hold *slots* of one preallocated KV cache and join and leave
without the cache being copied; the decode step has fixed shapes, so on CUDA it is a captured graph.

The slab is transformers' ``StaticCache`` of ``[B, heads, L, head_dim]`` per layer with persistent
``[B, 1]`` token and position buffers and a ``[B, L]`` boolean key mask (``B`` a power of two, ``L`` a
multiple of :data:`static_decode.LENGTH_BUCKET`). Its columns are a *ring*: every decode step writes column
``w`` of every row (the cache's own device counter, set back to 0 when it reaches ``L``), so rows need no
shared start. A row's keys are the columns its mask marks, in any order (rotary/absolute positions are
applied before caching, and attention is a masked sum): what a row reads equals what it reads alone.

- **join**: joiners are prefilled together (left-padded, soft prompts included, through a dynamic cache as
  in the one-shot path); each takes a free slot (lowest first) and its prompt's keys and values are written
  into that slot's columns ``[w - n, w)`` (mod ``L``), its mask row set to exactly those columns, its
  position buffer to ``n``. Only the joiner's own slot is written.
- **decode**: mask column ``w`` is set for every row (each writes its own token there), the step runs (or
  replays), positions advance by one in place; the host never rebuilds a mask or a position tensor.
- **leave**: the slot goes back on the free list; nothing is copied. A dead slot keeps computing garbage
  that no live row reads until a joiner resets its mask.

A row that needs ``n + limit`` columns fits when ``L`` is at least that: its own writes then never reach its
prompt's columns. A joiner that needs more rows or columns than the slab has grows it (a new slab, the old
one copied into its corner: the only copy, amortised by the buckets). A capture's warm-up steps write a
few columns; they are saved and restored around it, so capturing mid-batch loses nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import kv_rows
from adapterhub_local.inference.generation import cache_keyword, cache_of, forward_cached
from adapterhub_local.inference.multi_lora import BatchContext
from adapterhub_local.inference.serve_kinds import staged_modules
from adapterhub_local.inference.soft_prompt import Row, build_batch
from adapterhub_local.inference.static_decode import (
    GraphBackend,
    attention_mask,
    bucket_length,
    bucket_rows,
    next_slab_ident,
    static_support,
)

WARMUP_COLUMNS = 4
"""Columns a capture's warm-up steps may write (saved and restored around a capture)."""


class SlabRows:
    """A static slab whose slots rows join and leave (see the module docstring).

    Args:
        model: a decoder the multi-adapter modules are wrapped into.
        context: the model's :class:`BatchContext`.
        graphs: how to capture and replay the decode step (CUDA graphs on CUDA); ``None`` runs it eagerly.
        context_length: the base's positions; a free slot's position stops at the last one (absolute
            position embeddings would overrun their table).
    """

    def __init__(self, model: nn.Module, context: BatchContext, graphs: GraphBackend | None = None,
                 context_length: int = 1 << 30) -> None:
        reason = static_support(model)
        if reason is not None:
            raise UnsupportedError(f"static continuous batching cannot run this base: {reason}",
                                   "serve it with decoder='dynamic'")
        self.model: Any = model
        self.context = context
        self.graphs = graphs
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eager_mask = (getattr(model.config, "_attn_implementation", None) or "eager") == "eager"
        self._cache_kw = cache_keyword(model)
        self.ident = next_slab_ident()
        self.last_position = context_length - 1
        self.cache: Any = None
        self.rows = 0
        self.columns = 0
        self.tokens = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.write = 0
        """The ring column the next decode step writes (host copy of the cache's counter)."""
        self._free: list[int] = []
        self._adapters: list[int] = []
        """Each slot's global adapter slot (0: none or free)."""
        self._plan: tuple[Any, ...] | None = None  # (layout, staged shapes) at the last staging
        self._replay: Callable[[], None] | None = None
        self._logits: torch.Tensor | None = None
        self._captured_for: tuple[Any, ...] | None = None
        self.captures = 0
        """Decode steps captured so far (each costs a warm-up and a capture)."""
        self.grown = 0
        """Times the slab was reallocated larger (each copies the old slab once)."""
        self.holder: object | None = None
        """The open batch using the slab (one at a time: every step decodes all of its slots)."""

    def claim(self, holder: object) -> bool:
        """Reserve the slab for ``holder`` (an open batch); ``False`` if another holds it."""
        if self.holder is not None and self.holder is not holder:
            return False
        self.holder = holder
        return True

    def release(self, holder: object) -> None:
        """End ``holder``'s hold (its rows must be freed already)."""
        if self.holder is holder:
            self.holder = None

    @property
    def used(self) -> int:
        """Occupied slots."""
        return self.rows - len(self._free)

    # ----------------------------------------------------------------- join
    @torch.inference_mode()
    def join(self, prompts: list[Row], lengths: list[int], needs: list[int], adapters: list[int],
             embeddings: nn.Embedding, pad_id: int) -> tuple[list[int], torch.Tensor]:
        """Prefill joiners into free slots. ``lengths``: each joiner's real tokens (virtual + prompt);
        ``needs``: columns it may occupy (length + token limit); ``adapters``: global adapter slots. Returns
        the slots taken and the last-position logits ``[J, V]`` (each joiner's first token)."""
        batch = build_batch(prompts, embeddings, pad_id, left=True, slots=adapters)
        self.context.staged = None
        self.context.set_rows(adapters)
        inputs: dict[str, Any] = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        if batch.inputs_embeds is not None:
            inputs["inputs_embeds"] = batch.inputs_embeds
        else:
            inputs["input_ids"] = batch.input_ids
        out = forward_cached(self.model, **inputs)
        prefill = cache_of(out)
        self._fit(prefill, self.used + len(prompts), max(needs))
        places = [heapq.heappop(self._free) for _ in prompts]
        width = int(batch.input_ids.shape[1])
        counts = torch.tensor(lengths, dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(len(prompts)), counts)  # [N] joiner of each written column
        offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rel = offset - counts[owner]  # -n .. -1: the columns just before the write column
        slots = torch.tensor(places, dtype=torch.long)[owner]
        ring = (self.write + rel) % self.columns
        kv_rows.write_rows(self.cache, prefill, slots.to(self.device), ring.to(self.device), owner.to(self.device),
                           (width + rel).to(self.device))
        index = torch.tensor(places, dtype=torch.long, device=self.device)
        self.mask.index_fill_(0, index, False)
        self.mask[slots.to(self.device), ring.to(self.device)] = True
        self.positions.index_copy_(0, index, counts.to(self.device)[:, None])
        for place, adapter in zip(places, adapters, strict=True):
            self._adapters[place] = adapter
        self._plan = None  # restage before the next step
        self.context.clear()
        logits: torch.Tensor = out.logits[:, -1]
        return places, logits

    def _fit(self, like: Any, rows: int, columns: int) -> None:
        """Grow the slab (allocate, copy the old one into its corner) until it has ``rows`` slots and at
        least ``columns`` columns."""
        want_rows, want_columns = max(self.rows, bucket_rows(rows)), max(self.columns, bucket_length(columns))
        if self.cache is not None and (want_rows, want_columns) == (self.rows, self.columns):
            return
        from transformers import StaticCache

        heads, sizes, dtype = kv_rows.layer_shapes(like)
        cache = StaticCache(config=self.model.config, max_cache_len=want_columns)
        cache.early_initialization(want_rows, heads, sizes, dtype, self.device)
        mask = torch.zeros((want_rows, want_columns), dtype=torch.bool, device=self.device)
        tokens = torch.zeros((want_rows, 1), dtype=torch.long, device=self.device)
        positions = torch.zeros((want_rows, 1), dtype=torch.long, device=self.device)
        if self.cache is not None:
            kv_rows.copy_into(self.cache, cache)
            mask[: self.rows, : self.columns] = self.mask
            tokens[: self.rows] = self.tokens
            positions[: self.rows] = self.positions
            self.grown += 1
        kv_rows.set_write_position(cache, self.write)
        for place in range(self.rows, want_rows):
            heapq.heappush(self._free, place)
        self._adapters += [0] * (want_rows - self.rows)
        self.cache, self.mask, self.tokens, self.positions = cache, mask, tokens, positions
        self.rows, self.columns = want_rows, want_columns
        self._plan, self._replay, self._logits, self._captured_for = None, None, None, None

    # ---------------------------------------------------------------- leave
    @torch.inference_mode()
    def free(self, places: list[int]) -> None:
        """Return slots to the free list (nothing is copied; a joiner's prefill resets the slot's mask)."""
        for place in places:
            self._adapters[place] = 0
            heapq.heappush(self._free, place)
        if self.cache is not None and self.used == 0:  # empty: the ring starts over
            self.write = 0
            kv_rows.set_write_position(self.cache, 0)

    # --------------------------------------------------------------- decode
    @torch.inference_mode()
    def feed(self, order: torch.Tensor, tokens: torch.Tensor) -> None:
        """Set the next step's input token of slots ``order`` (``[n]`` long, on the device) in place."""
        self.tokens[:, 0].index_copy_(0, order, tokens)

    @torch.inference_mode()
    def decode(self, order: torch.Tensor) -> torch.Tensor:
        """One step for every slot; returns the logits ``[n, V]`` of slots ``order``."""
        if self.write >= self.columns:
            self.write = 0
            kv_rows.set_write_position(self.cache, 0)
        self.mask[:, self.write] = True
        plan = self._stage()
        self.context.staged = self.ident
        try:
            if self.graphs is not None:
                if self._replay is None or self._logits is None or self._captured_for != plan:
                    self._capture(plan)
                assert self._replay is not None and self._logits is not None
                self._replay()
                logits = self._logits
            else:
                logits = self._step()
        finally:
            self.context.staged = None
        self.write += 1
        self.positions.add_(1).clamp_(max=self.last_position)  # only free slots ever reach the clamp
        return logits.index_select(0, order)

    def _stage(self) -> tuple[Any, ...]:
        """Stage the slots' adapter operands (after a join, or when a stack was reallocated)."""
        if self._plan is None or self._plan[0] != self.context.layout:
            shapes = tuple(module.stage(self.ident, self._adapters) for module in staged_modules(self.model))
            self._plan = (self.context.layout, shapes)
        return self._plan

    def _step(self) -> torch.Tensor:
        """One decode step on the slab's buffers: the function a graph captures."""
        mask = attention_mask(self.mask[:, None, None, :], self.eager_mask, self.dtype)
        out = self.model(input_ids=self.tokens, attention_mask=mask, position_ids=self.positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache})
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def _capture(self, plan: tuple[Any, ...]) -> None:
        """Capture the step; its warm-up writes are undone (columns, counter and buffers as before)."""
        assert self.graphs is not None
        start = self.write if self.write + WARMUP_COLUMNS <= self.columns else 0
        columns = torch.arange(start, start + WARMUP_COLUMNS, device=self.device)
        saved = kv_rows.save_columns(self.cache, columns)
        buffers = (self.tokens.clone(), self.positions.clone(), self.mask.clone())
        kv_rows.set_write_position(self.cache, start)
        self.context.capturing = True
        try:
            self._replay, self._logits = self.graphs.capture(lambda: self._step())
        finally:
            self.context.capturing = False
        kv_rows.restore_columns(self.cache, columns, saved)
        kv_rows.set_write_position(self.cache, self.write)
        for buffer, copy in zip((self.tokens, self.positions, self.mask), buffers, strict=True):
            buffer.copy_(copy)
        self._captured_for = plan
        self.captures += 1
