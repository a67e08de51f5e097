"""The multi-adapter embedding: one frozen ``nn.Embedding`` plus, per resident adapter, a LoRA on the
embedding (PEFT's ``lora_embedding_A/B``) and/or trainable-token rows (PEFT's ``trainable_token_indices``),
selected per batch row by the shared :class:`~adapterhub_local.inference.multi_lora.BatchContext`.

Stacks (``S`` local slots, slot 0 all zeros / no tokens; ``V`` vocabulary, ``d`` hidden, ``R`` the largest
resident embedding rank, ``K`` the most trainable tokens of a resident adapter):

- LoRA: ``Aᵀ`` as ``[S, V, R]`` and ``scale·Bᵀ`` as ``[S, R, d]``. PEFT's embedding LoRA looks up the token's
  column of ``A`` and multiplies by ``B``: ``y = W[id] + scale · B · A[:, id]``. Per row this is a gather of
  ``T`` rows of ``R`` values from the row's own ``Aᵀ`` (index ``slot·V + id``) and one ``[T, R] @ [R, d]``
  matmul: ``O(T·R·d)`` per row, the same as a LoRA linear of rank ``R``, whatever the vocabulary or the
  number of adapters. Rows without an embedding LoRA read slot 0 (zeros) and get ``W[id] + 0`` — the same
  bits as the base.
- Trainable tokens: the listed ids as ``[S, K]`` (``-1`` pads, never an id) and their new rows ``[S, K, d]``.
  PEFT *replaces* those rows of the embedding (``W.index_copy(0, ids, rows)``); per row we compare the ``T``
  ids against the row's ``K`` listed ids (``[T, K]`` booleans), pick the new row by a 0/1 matmul (exact: one
  1·v plus zeros) and select it where an id matched: ``O(T·K·d)`` per row.

No Python loop over rows or adapters and no host sync in a step; per-batch bookkeeping happens once. For
static decoding :meth:`stage` copies the rows' local slots into the slab's buffer, like
:meth:`MultiLoraLinear.stage`; every reallocation of a stack bumps :attr:`BatchContext.layout`.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterhub_local.errors import ShapeMismatchError, UnsupportedError
from adapterhub_local.inference.multi_lora import BatchContext, put_module

SLOT_GROWTH = 4


class MultiEmbedding(nn.Module):
    """A base embedding plus resident embedding LoRAs and trainable tokens, selected per row."""

    def __init__(self, base: nn.Module, context: BatchContext, name: str) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise UnsupportedError(f"{name} is a {type(base).__name__}, not an embedding",
                                   "target the model's token embedding (nn.Embedding)")
        self.base = base
        self.name = name
        self._context = context
        self.vocab, self.hidden = int(base.weight.shape[0]), int(base.weight.shape[1])
        self._dtype: torch.dtype = base.weight.dtype
        self._device: torch.device = base.weight.device
        self.rank = 0  # R (0: no embedding LoRA resident)
        self.tokens = 0  # K (0: no trainable tokens resident)
        self.slots = 2
        self.a_stack = torch.zeros(self.slots, self.vocab, 0, dtype=self._dtype, device=self._device)
        self.b_stack = torch.zeros(self.slots, 0, self.hidden, dtype=self._dtype, device=self._device)
        self.id_stack = torch.full((self.slots, 0), -1, dtype=torch.long, device=self._device)
        self.row_stack = torch.zeros(self.slots, 0, self.hidden, dtype=self._dtype, device=self._device)
        self.slot_map = torch.zeros(64, dtype=torch.long, device=self._device)
        self._local: dict[int, int] = {}  # global slot -> local slot
        self._lora: dict[int, int] = {}  # local slot -> rank
        self._token_count: dict[int, int] = {}  # local slot -> K of that adapter
        self._seen_version = -1
        self._batch: tuple[bool, bool] = (False, False)  # (a LoRA row, a token row) in this batch
        self._rows_local = torch.zeros(1, dtype=torch.long, device=self._device)
        self._staged: dict[int, torch.Tensor] = {}  # slab id -> rows' local slots

    @property
    def weight(self) -> torch.Tensor:
        """The base embedding weight (code that reads ``get_input_embeddings().weight`` keeps working)."""
        weight = self.base.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def active(self) -> int:
        return len(self._local)

    @property
    def stack_bytes(self) -> int:
        tensors = (self.a_stack, self.b_stack, self.id_stack, self.row_stack)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(ids)
        context = self._context
        if context.staged is not None:
            rows_local = self._staged.get(context.staged)
            if rows_local is None:
                return y
            return self._adapt(ids, y, rows_local, self.rank > 0, self.tokens > 0)
        rows = context.slots
        if rows is None or not self._local:
            return y
        if self._seen_version != context.version:
            self._prepare_batch(rows)
        lora, tokens = self._batch
        if not (lora or tokens):
            return y
        return self._adapt(ids, y, self._rows_local, lora, tokens)

    def forward_rows(self, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """The embedding of ``ids`` (``[B, T]``) with row ``k`` adapted by global slot ``slots[k]`` — for
        callers that embed outside the model's forward (soft-prompt batches), before the context is set."""
        y: torch.Tensor = self.base(ids)
        local = [self._local.get(s, 0) for s in slots]
        lora = any(s in self._lora for s in local)
        tokens = any(s in self._token_count for s in local)
        if not (lora or tokens):
            return y
        rows_local = torch.tensor(local, dtype=torch.long).to(self._device)
        return self._adapt(ids, y, rows_local, lora, tokens)

    def _adapt(self, ids: torch.Tensor, y: torch.Tensor, rows_local: torch.Tensor, lora: bool,
               tokens: bool) -> torch.Tensor:
        rows = rows_local.shape[0]
        ids3 = ids.reshape(rows, -1)  # [B, T]
        out = y.reshape(rows, ids3.shape[1], self.hidden)
        if lora and self.rank > 0:
            flat = (rows_local[:, None] * self.vocab + ids3).reshape(-1)  # [B·T] rows of Aᵀ
            after_a = self.a_stack.reshape(-1, self.rank).index_select(0, flat).reshape(rows, -1, self.rank)
            delta = torch.bmm(after_a, self.b_stack.index_select(0, rows_local))  # [B, T, d]
            out = out + delta.to(out.dtype)
        if tokens and self.tokens > 0:
            listed = self.id_stack.index_select(0, rows_local)  # [B, K]
            match = ids3[:, :, None] == listed[:, None, :]  # [B, T, K]
            new_rows = torch.bmm(match.to(self._dtype), self.row_stack.index_select(0, rows_local))  # [B, T, d]
            out = torch.where(match.any(-1, keepdim=True), new_rows.to(out.dtype), out)
        return out.reshape(y.shape)

    def _prepare_batch(self, rows: torch.Tensor) -> None:
        """Once per batch: whether any row adapts here, and each row's local slot (device ops, no host sync)."""
        self._seen_version = self._context.version
        present = {self._local[g] for g in self._context.present if g in self._local}
        self._batch = (any(s in self._lora for s in present), any(s in self._token_count for s in present))
        if present:
            known = rows < self.slot_map.numel()
            self._rows_local = self.slot_map.index_select(0, torch.where(known, rows, torch.zeros_like(rows)))

    # ------------------------------------------------------------ staging
    def stage(self, slab: int, slots: list[int]) -> tuple[int, ...]:
        """Copy the rows' local slots into the slab's buffer; ``()`` when no row adapts here."""
        local = [self._local.get(g, 0) for g in slots]
        if not set(local) - {0}:
            self._staged.pop(slab, None)
            return ()
        buffer = self._staged.get(slab)
        if buffer is None or buffer.shape[0] != len(slots):
            buffer = torch.zeros(len(slots), dtype=torch.long, device=self._device)
            self._staged[slab] = buffer
        buffer.copy_(torch.tensor(local, dtype=torch.long))
        return (len(slots), self.rank, self.tokens)

    def unstage(self, slab: int) -> None:
        self._staged.pop(slab, None)

    # ---------------------------------------------------------- residency
    def install(self, global_slot: int, lora: tuple[torch.Tensor, torch.Tensor] | None,
                tokens: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Place an adapter: ``lora`` = (``A`` ``[r, V]``, ``scale·B`` ``[d, r]``), ``tokens`` = (ids ``[K]``,
        new rows ``[K, d]``)."""
        self._seen_version = -1
        if lora is not None:
            a, b_scaled = lora
            rank = int(a.shape[0])
            if tuple(a.shape) != (rank, self.vocab) or tuple(b_scaled.shape) != (self.hidden, rank):
                raise ShapeMismatchError(f"{self.name}: embedding LoRA A {list(a.shape)} / B {list(b_scaled.shape)} "
                                         f"do not fit a {self.vocab}×{self.hidden} embedding",
                                         "use an adapter made for this base")
        if tokens is not None:
            ids, rows = tokens
            if ids.dim() != 1 or tuple(rows.shape) != (ids.shape[0], self.hidden):
                raise ShapeMismatchError(f"{self.name}: trainable tokens {list(ids.shape)} / rows {list(rows.shape)} "
                                         f"do not fit a {self.vocab}×{self.hidden} embedding",
                                         "use an adapter made for this base")
        if global_slot in self._local:
            self.uninstall(global_slot)
        used = set(self._local.values())
        local = next((s for s in range(1, self.slots) if s not in used), None)
        if local is None:
            local = self.slots
        self._resize(max(self.rank, 0 if lora is None else int(lora[0].shape[0])),
                     max(self.tokens, 0 if tokens is None else int(tokens[0].shape[0])),
                     max(self.slots, local + 1 if local < self.slots else local + SLOT_GROWTH))
        if global_slot >= self.slot_map.numel():
            grown = torch.zeros(2 * global_slot + 2, dtype=torch.long, device=self._device)
            grown[: self.slot_map.numel()] = self.slot_map
            self.slot_map = grown
        if lora is not None:
            a, b_scaled = lora
            rank = int(a.shape[0])
            self.a_stack[local, :, :rank].copy_(a.T)
            self.b_stack[local, :rank].copy_(b_scaled.T)
            self._lora[local] = rank
        if tokens is not None:
            ids, rows = tokens
            count = int(ids.shape[0])
            self.id_stack[local, :count].copy_(ids)
            self.row_stack[local, :count].copy_(rows)
            self._token_count[local] = count
        self.slot_map[global_slot] = local
        self._local[global_slot] = local

    def uninstall(self, global_slot: int) -> None:
        local = self._local.pop(global_slot, None)
        self._seen_version = -1
        if local is None:
            return
        self.slot_map[global_slot] = 0
        self.a_stack[local].zero_()
        self.b_stack[local].zero_()
        self.id_stack[local].fill_(-1)
        self.row_stack[local].zero_()
        self._lora.pop(local, None)
        self._token_count.pop(local, None)
        rank = max(self._lora.values(), default=0)
        count = max(self._token_count.values(), default=0)
        if rank < self.rank or count < self.tokens:  # the largest left: shrink to what the pool budgets
            self._resize(rank, count, self.slots, shrink=True)

    def _resize(self, rank: int, count: int, slots: int, shrink: bool = False) -> None:
        if (rank, count, slots) == (self.rank, self.tokens, self.slots):
            return
        assert shrink or (rank >= self.rank and count >= self.tokens and slots >= self.slots)
        keep_s, keep_r, keep_k = min(slots, self.slots), min(rank, self.rank), min(count, self.tokens)
        a = torch.zeros(slots, self.vocab, rank, dtype=self._dtype, device=self._device)
        b = torch.zeros(slots, rank, self.hidden, dtype=self._dtype, device=self._device)
        ids = torch.full((slots, count), -1, dtype=torch.long, device=self._device)
        rows = torch.zeros(slots, count, self.hidden, dtype=self._dtype, device=self._device)
        a[:keep_s, :, :keep_r] = self.a_stack[:keep_s, :, :keep_r]
        b[:keep_s, :keep_r] = self.b_stack[:keep_s, :keep_r]
        ids[:keep_s, :keep_k] = self.id_stack[:keep_s, :keep_k]
        rows[:keep_s, :keep_k] = self.row_stack[:keep_s, :keep_k]
        self.a_stack, self.b_stack, self.id_stack, self.row_stack = a, b, ids, rows
        self.rank, self.tokens, self.slots = rank, count, slots
        self._context.layout += 1


def wrap_embedding(model: nn.Module, name: str, context: BatchContext) -> MultiEmbedding:
    """Wrap the embedding at ``name`` once (idempotent) and return its wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, MultiEmbedding):
        return module
    wrapper = MultiEmbedding(module, context, name)
    put_module(model, name, wrapper)
    return wrapper


def embedding_wrappers(model: nn.Module) -> list[MultiEmbedding]:
    return [m for m in model.modules() if isinstance(m, MultiEmbedding)]


def embed_rows(embeddings: nn.Module, ids: torch.Tensor, slots: list[int] | None) -> torch.Tensor:
    """``embeddings(ids)``, adapted per row when the embedding is a :class:`MultiEmbedding` and ``slots`` given."""
    if slots is not None and isinstance(embeddings, MultiEmbedding):
        return embeddings.forward_rows(ids, slots)
    out: torch.Tensor = embeddings(ids)
    return out
