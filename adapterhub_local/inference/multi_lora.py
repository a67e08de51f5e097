"""The multi-adapter linear: one frozen base linear plus a stack of LoRA pairs, applied per batch row.

Every wrapped module holds, for the adapters that target it, ``A`` stacked as ``[S, R, d_in]`` and
``(scale·B)ᵀ`` stacked as ``[S, R, d_out]`` (``S`` local slots, slot 0 all zeros; ``R`` the largest resident
rank, smaller ranks zero-padded — exact, because padded rows/columns contribute exact zeros). Both stacks
are rank-major, so ``[S·R, d]`` is a free view of either (the dense strategy's operand). Each batch
only computes up to the largest rank *it* uses on that module (a view of the stacks), and skips modules
that none of its rows adapt, so one resident rank-256 adapter does not slow batches of rank-16 ones. A shared
:class:`BatchContext` carries the batch's per-row *global* adapter slot as a device tensor; each module maps
it to its local slot with a lookup table, so an adapter that does not target a module (or a row with no
adapter, or a soft-prompt row) lands on the zero slot.

DoRA adapters add a per-output-feature factor ``f = m / ‖W + scale·B·A‖_row`` (computed once, at install,
by :func:`adapterhub_local.lora.dora_factor`); the module stacks ``g = f - 1`` as ``[S, d_out]`` (slot 0 and
plain-LoRA slots zero) and, when a batch holds a DoRA row, gathers it per row like the LoRA operands:
``y = base(x) + Δ + g ⊙ (base(x) - bias + Δ)`` — PEFT's eval-mode DoRA output ``bias + f ⊙ (W·x + Δ)``
rearranged so a plain-LoRA row (``g = 0``) gets exactly ``base(x) + Δ``, the same bits as without DoRA.

Two batched operations, in the spirit of Punica's BGMV/SGMV and S-LoRA, both plain torch (CPU and GPU):

- ``gather`` (BGMV/SGMV): each row's ``A`` and ``B``, gathered by index, and two batched matmuls (shrink
  ``x·Aᵀ`` to rank, expand by ``Bᵀ``). Reads each adapter once per row that uses it. The rows are split into
  *rank groups* (by each row's adapter rank on the module, rounded up to a power of two), each computed at
  its own largest rank, so one composed rank-32 row does not make every rank-16 row pay rank 32, and rows
  with no adapter on the module are not computed at all. The groups' gathered operands are built **once per
  batch membership** (not per step: membership changes only on join/leave) and kept by the
  :class:`BatchContext` until the batch changes, so a decode step is two ``bmm`` per group with no
  ``index_select`` of the stacks — the per-step gather was a third of the LoRA cost on a SmolLM2-shape CPU
  decode. The kept operands are bounded (:attr:`BatchContext.gather_budget`); past it a module gathers
  from its stacks each step as before.
- ``dense``: once per batch, concatenate the batch's adapters into ``[P·R, d_in]`` / ``[P·R, d_out]``;
  per step, one matmul to all ``P·R`` rank channels, a per-row mask keeping the row's own adapter, one
  matmul back. Reads each adapter of the batch once per step (the bytes bound) at ``P×`` the (tiny) LoRA
  multiply-adds — the better trade where decode is memory-bound (GPUs).

Neither loops over adapters in Python, has data-dependent shapes, or synchronises with the host inside a
step (per-batch bookkeeping happens once, before the first step). For CUDA-graph capture
(:mod:`static_decode`) the decoder *stages* each batch before its first step (:meth:`MultiLoraLinear.stage`):
every module copies what the batch needs into persistent buffers owned by the decoder's slab — for ``dense``
the batch's adapters at the batch's rank bucket plus the row-ownership mask, for ``gather`` each rank group's
rows and gathered operands (or, past the budget, its rows' local slots) — and returns the buffers' shapes. A
captured step reads only those buffers (and, past the budget, views of the stacks), so it stays valid while
the shapes match and no stack was reallocated (each reallocation bumps :attr:`BatchContext.layout`); a batch
of rank-16 adapters never pays for a resident rank-256 one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterhub_local.errors import ShapeMismatchError, UnsupportedError
from adapterhub_local.inference import cpu_lora_kernel

GATHER_BUDGET = 1 << 30
"""Default bound on one batch's kept gathered operands (1 GiB: 32 distinct rank-16 adapters on q, k, v, o of a
SmolLM2-135M shape take 118 MB)."""
DYNAMIC = "dynamic"
"""The reservation key of the dynamic (non-staged) batch."""


class BatchContext:
    """Per-batch state shared by every :class:`MultiLoraLinear` of one model."""

    def __init__(self, device: torch.device, max_rows: int = 256, strategy: str = "auto",
                 gather_budget: int = GATHER_BUDGET) -> None:
        self.device = device
        self.gather_budget = gather_budget
        """Bytes of gathered per-row operands one batch (or one static slab) may keep; modules past it gather
        from their stacks each step instead."""
        self._held: dict[object, dict[str, int]] = {}  # batch key -> module name -> bytes of kept operands
        self.operands: dict[str, list[Group]] = {}
        """The current (dynamic) batch's rank groups per module name; dropped when the batch changes."""
        self.strategy = resolve_strategy(strategy, device)
        """``gather`` (per-row BGMV) or ``dense`` (batch adapters concatenated, output masked per row)."""
        self._buffer = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.slots: torch.Tensor | None = None
        """``[rows]`` global slot per row (0 = no LoRA) or ``None``: no LoRA in this batch, base only."""
        self.present: frozenset[int] = frozenset()
        """The distinct global slots of the batch (host side, set once per batch)."""
        self.rows: list[int] = []
        """Each row's global slot (host side)."""
        self.version = 0
        """Bumped per batch, so modules recompute their per-batch rank once (not per step)."""
        self.staged: int | None = None
        """Static mode: the slab whose staged operands every module reads (see :meth:`MultiLoraLinear.stage`)."""
        self.layout = 0
        """Bumped whenever a stack is reallocated: a CUDA graph captured under an older layout reads freed
        memory and must be captured again."""
        self.capturing = False
        """True while a decoder records a step for replay (a CUDA graph): a recording holds torch ops only, so the
        CPU decode kernel (a call torch does not see) stands aside for the step being recorded."""

    def reserve(self, key: object, module: str, nbytes: int) -> bool:
        """Account ``nbytes`` of gathered operands for ``module`` under ``key`` (the dynamic batch, or a static
        slab), replacing what it held there; ``False`` (nothing reserved) when the key would exceed the budget."""
        held = self._held.setdefault(key, {})
        held.pop(module, None)
        if sum(held.values()) + nbytes > self.gather_budget:
            return False
        held[module] = nbytes
        return True

    def release(self, key: object, module: str | None = None) -> None:
        """Forget ``module``'s reservation under ``key`` (every module's when ``module`` is ``None``)."""
        if module is None:
            self._held.pop(key, None)
        else:
            self._held.get(key, {}).pop(module, None)

    def _new_batch(self) -> None:
        self.version += 1
        self.operands = {}
        self.release(DYNAMIC)

    def set_rows(self, slots: list[int]) -> None:
        """Point the batch at these global slots (copied into a persistent device buffer)."""
        self._new_batch()
        self.rows = list(slots)
        self.present = frozenset(slots) - {0}
        if not self.present:
            self.slots = None
            return
        if len(slots) > self._buffer.numel():
            self._buffer = torch.zeros(2 * len(slots), dtype=torch.long, device=self.device)
        view = self._buffer[: len(slots)]
        view.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        self.slots = view

    def clear(self) -> None:
        self.slots = None
        self.rows = []
        self.present = frozenset()
        self._new_batch()


STRATEGIES = ("auto", "gather", "dense")
SLOT_GROWTH = 8
"""Slots a full stack grows by when all are taken."""


def rank_bucket(rank: int) -> int:
    """A rank rounded up to a power of two (the static step's shapes; fewer distinct captures)."""
    return 1 << max(0, rank - 1).bit_length()


def adapter_bucket(count: int) -> int:
    """How many adapter places a staged dense operand has: a power of two up to 8, then multiples of 8."""
    return rank_bucket(count) if count <= 8 else -(-count // 8) * 8


@dataclass
class Group:
    """The rows of a batch whose adapters on one module fall in one rank bucket, with their operands."""

    rank: int
    """The rank the group computes at (its largest adapter's; the bucket in static mode)."""
    local: torch.Tensor
    """``[n]`` each row's local slot."""
    rows: torch.Tensor | None
    """``[n]`` the rows' positions in the batch; ``None``: every row of the batch, in order."""
    a: torch.Tensor | None = None
    """``[n, rank, d_in]`` the rows' ``A``, gathered once per batch; ``None``: past the budget, gather per step."""
    b: torch.Tensor | None = None
    """``[n, rank, d_out]`` the rows' ``(scale·B)ᵀ``."""

    @property
    def shape(self) -> tuple[int, int, bool, bool]:
        return (int(self.local.shape[0]), self.rank, self.rows is None, self.a is not None)


def rank_groups(local: list[int], ranks: dict[int, int], cap: int, bucketed: bool) -> list[tuple[int, list[int]]]:
    """Split batch rows by their adapter's rank bucket: ``[(rank, row positions)]``, smallest rank first. Rows
    on local slot 0 (no adapter on the module) are in no group. ``rank`` is the bucket (``bucketed``, for
    stable static shapes) or the group's largest rank, at most ``cap`` (the stacks' padded rank)."""
    members: dict[int, list[int]] = {}
    largest: dict[int, int] = {}
    for row, slot in enumerate(local):
        if slot == 0:
            continue
        bucket = rank_bucket(ranks[slot])
        members.setdefault(bucket, []).append(row)
        largest[bucket] = max(largest.get(bucket, 0), ranks[slot])
    return [(min(bucket if bucketed else largest[bucket], cap), members[bucket]) for bucket in sorted(members)]


@dataclass
class Staged:
    """One module's operands for one slab's batches (persistent: a captured step reads their addresses)."""

    rank: int
    """The rank the step computes at (the batch's largest on this module, bucketed, at most the stack's)."""
    rows_local: torch.Tensor
    """``[B]`` each row's local slot (the DoRA factor's index)."""
    groups: list[Group] | None = None
    """``gather``: the batch's rank groups (persistent buffers)."""
    a: torch.Tensor | None = None
    """``dense``: ``[P·rank, d_in]``, the batch's adapters (zero-padded to ``P`` places)."""
    b: torch.Tensor | None = None
    """``dense``: ``[P·rank, d_out]``."""
    owner: torch.Tensor | None = None
    """``dense``: ``[B, P]``, 1 where a row uses a place's adapter."""

    @property
    def shape(self) -> tuple[object, ...]:
        places = 0 if self.owner is None else int(self.owner.shape[1])
        groups = tuple(g.shape for g in self.groups or ())
        return (int(self.rows_local.shape[0]), places, self.rank, groups)


def resolve_strategy(strategy: str, device: torch.device) -> str:
    """``auto``: ``dense`` on GPUs, where decode is bound by bytes read and dense reads each adapter of the
    batch once (gathering copies it once per row); ``gather`` on CPUs, where dense's extra multiply-adds cost
    more than the copies (measured in ``benchmarks/serving.py``)."""
    if strategy not in STRATEGIES:
        raise UnsupportedError(f"unknown multi-LoRA strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "dense" if device.type == "cuda" else "gather"
    return strategy


def gathered_lora(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``y[i] = x[i] · A[rows[i]]ᵀ · B[rows[i]]ᵀ`` for a batch of rows.

    ``x``: ``[B, T, d_in]``; ``a_stack``: ``[S, R, d_in]``; ``b_stack``: ``[S, R, d_out]`` (``(scale·B)ᵀ``);
    ``rows``: ``[B]`` long. Returns ``[B, T, d_out]``.
    """
    a = a_stack.index_select(0, rows)  # [B, R, d_in]
    b = b_stack.index_select(0, rows)  # [B, R, d_out]
    shrunk = torch.bmm(x, a.transpose(1, 2))  # [B, T, R]
    return torch.bmm(shrunk, b)  # [B, T, d_out]


def grouped_lora(x: torch.Tensor, groups: list[Group], a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """``y[i] = x[i] · A[i]ᵀ · B[i]ᵀ`` per row, one pair of batched matmuls per rank group (rows in no group get
    exact zeros). ``x``: ``[B, T, d_in]``; stacks as for :func:`gathered_lora` (read only by groups gathered per
    step). Returns ``[B, T, d_out]``."""
    if len(groups) == 1 and groups[0].rows is None:
        return _group_lora(x, groups[0], a_stack, b_stack)
    out = x.new_zeros(x.shape[0], x.shape[1], b_stack.shape[-1])
    for group in groups:  # one per rank bucket present (a handful), never per adapter
        assert group.rows is not None
        out.index_copy_(0, group.rows, _group_lora(x.index_select(0, group.rows), group, a_stack, b_stack))
    return out


def _group_lora(x: torch.Tensor, group: Group, a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    if group.a is None or group.b is None:
        return gathered_lora(x, a_stack[:, :group.rank], b_stack[:, :group.rank], group.local)
    return torch.bmm(torch.bmm(x, group.a.transpose(1, 2)), group.b)


def kernel_applies(x: torch.Tensor, y: torch.Tensor, groups: list[Group]) -> bool:
    """Whether this step's per-row LoRA runs on the CPU decode kernel: one token per row on a CPU, ``y`` (the base
    output) contiguous in ``x``'s dtype, every group within the kernel's rank (see :mod:`cpu_lora_kernel`)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":  # checked first: cheap, and dynamo-safe
        return False
    rank = max((group.rank for group in groups), default=0)
    return y.is_contiguous() and cpu_lora_kernel.applies(x, y, rank)


def grouped_lora_add_(out: torch.Tensor, x: torch.Tensor, groups: list[Group], a_stack: torch.Tensor,
                      b_stack: torch.Tensor) -> None:
    """``out[i] += x[i] · A[i]ᵀ · B[i]ᵀ`` in place for the rows of ``groups`` (one decode token per row), by the CPU
    kernel: what :func:`grouped_lora` computes, added where it is used. ``x``: ``[B, 1, d_in]``; ``out``:
    ``[B, 1, d_out]``; stacks as for :func:`gathered_lora` (read by groups whose operands were not kept)."""
    flat_x = x.reshape(x.shape[0], x.shape[2]).contiguous()
    flat_out = out.view(out.shape[0], out.shape[2])
    for group in groups:
        if group.a is not None and group.b is not None:
            cpu_lora_kernel.bgmv_add_(flat_out, flat_x, group.a, group.b, group.rank, None, group.rows)
        else:
            cpu_lora_kernel.bgmv_add_(flat_out, flat_x, a_stack, b_stack, group.rank, group.local, group.rows)


def dense_lora(x: torch.Tensor, a_flat: torch.Tensor, b_flat: torch.Tensor, owner: torch.Tensor,
               rank: int) -> torch.Tensor:
    """``y[i] = x[i] · A[k]ᵀ · B[k]ᵀ`` for row ``i``'s adapter ``k``, computed against all ``P`` adapters at once.

    ``a_flat``: ``[P·R, d_in]``; ``b_flat``: ``[P·R, d_out]``; ``owner``: ``[B, P]`` (1 where row ``i`` uses
    adapter ``k``, else 0) in ``x``'s dtype. Every rank channel of the other adapters is multiplied by an exact 0.
    """
    rows, adapters = owner.shape
    mask = owner[:, None, :, None].expand(rows, 1, adapters, rank).reshape(rows, 1, adapters * rank)
    return ((x @ a_flat.T) * mask) @ b_flat  # [B, T, d_out]


def weight_of(module: nn.Module) -> torch.Tensor:
    """A linear module's weight tensor."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """``(d_in, d_out, fan_in_fan_out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D":
        weight = weight_of(module)
        return int(weight.shape[0]), int(weight.shape[1]), True
    raise UnsupportedError(f"cannot attach LoRA to a {type(module).__name__}", "target nn.Linear or Conv1D modules")


class MultiLoraLinear(nn.Module):
    """A base linear plus any number of resident LoRA adapters, selected per row by the batch context."""

    def __init__(self, base: nn.Module, context: BatchContext, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.d_in, self.d_out, self.fan_in_fan_out = linear_dims(base)
        self._context = context
        weight = weight_of(base)
        self._dtype: torch.dtype = weight.dtype
        self._device: torch.device = weight.device
        self.rank = 1  # R: the padded rank of the stacks
        self.a_stack = torch.zeros(2, self.rank, self.d_in, dtype=self._dtype, device=self._device)
        self.b_stack = torch.zeros(2, self.rank, self.d_out, dtype=self._dtype, device=self._device)
        self.slot_map = torch.zeros(64, dtype=torch.long, device=self._device)  # global slot -> local slot
        self._local: dict[int, int] = {}  # global slot -> local slot
        self._ranks: dict[int, int] = {}  # local slot -> rank
        self._seen_version = -1
        self._batch_rank = 0  # largest rank among this batch's adapters on this module (0 = none)
        self._rows_local = torch.zeros(1, dtype=torch.long, device=self._device)
        self._dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._staged: dict[int, Staged] = {}  # slab id -> operands (static decoding)
        self.g_stack: torch.Tensor | None = None  # [S, d_out] DoRA factor - 1; None while no DoRA adapter is here
        self._dora: set[int] = set()  # local slots holding a DoRA adapter
        self._batch_dora = False  # whether this batch has a DoRA row on this module

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that inspects ``module.weight`` keeps working)."""
        return weight_of(self.base)

    @property
    def active(self) -> int:
        """How many resident adapters target this module."""
        return len(self._local)

    @property
    def stack_bytes(self) -> int:
        """Device bytes held by this module's stacks (padding and free slots included)."""
        total = self.a_stack.numel() * self.a_stack.element_size() + self.b_stack.numel() * self.b_stack.element_size()
        return total + (0 if self.g_stack is None else self.g_stack.numel() * self.g_stack.element_size())

    def _dora_scaled(self, y: torch.Tensor, delta: torch.Tensor, rows_local: torch.Tensor) -> torch.Tensor:
        """``y + Δ + g ⊙ (y - bias + Δ)`` with each row's ``g`` gathered from the stack (``y``: ``[B, T, d_out]``)."""
        assert self.g_stack is not None
        g = self.g_stack.index_select(0, rows_local)[:, None, :].to(y.dtype)  # [B, 1, d_out]
        bias = getattr(self.base, "bias", None)
        unbiased = y if bias is None else y - bias
        return y + delta + g * (unbiased + delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        if self._context.staged is not None:
            return self._static_forward(x, y, self._context.staged)
        rows = self._context.slots
        if rows is None or not self._local:
            return y
        if self._seen_version != self._context.version:
            self._prepare_batch(rows)
        if self._batch_rank == 0:  # no row of this batch has an adapter on this module
            return y
        x3 = x.reshape(rows.shape[0], -1, self.d_in).to(self._dtype)
        if self._dense is not None:
            a_cat, b_cat, owner = self._dense
            delta = dense_lora(x3, a_cat, b_cat, owner, self._batch_rank)
        else:
            groups = self._context.operands[self.name]
            if not self._context.capturing and kernel_applies(x3, y, groups):
                return self._kernel_forward(x3, y, groups, self._rows_local if self._batch_dora else None)
            delta = grouped_lora(x3, groups, self.a_stack, self.b_stack)
        if self._batch_dora:
            y3 = y.reshape(delta.shape)
            return self._dora_scaled(y3, delta.to(y.dtype), self._rows_local).reshape(y.shape)
        return y + delta.reshape(y.shape).to(y.dtype)

    def _static_forward(self, x: torch.Tensor, y: torch.Tensor, slab: int) -> torch.Tensor:
        """The LoRA term from the slab's staged operands only: what a CUDA graph captures."""
        staged = self._staged.get(slab)
        if staged is None:  # no row of the batch has an adapter on this module
            return y
        x3 = x.reshape(staged.rows_local.shape[0], -1, self.d_in).to(self._dtype)
        if staged.a is not None and staged.b is not None and staged.owner is not None:
            delta = dense_lora(x3, staged.a, staged.b, staged.owner, staged.rank)
        else:
            assert staged.groups is not None
            if not self._context.capturing and kernel_applies(x3, y, staged.groups):
                dora_rows = staged.rows_local if self.g_stack is not None else None
                return self._kernel_forward(x3, y, staged.groups, dora_rows)
            delta = grouped_lora(x3, staged.groups, self.a_stack, self.b_stack)
        if self.g_stack is not None:  # a DoRA adapter is resident (allocating the stack bumps the layout)
            y3 = y.reshape(delta.shape)
            return self._dora_scaled(y3, delta.to(y.dtype), staged.rows_local).reshape(y.shape)
        return y + delta.reshape(y.shape).to(y.dtype)

    def _kernel_forward(self, x3: torch.Tensor, y: torch.Tensor, groups: list[Group],
                        dora_rows: torch.Tensor | None) -> torch.Tensor:
        """A CPU decode step's LoRA term by the BGMV kernel: added into ``y`` (fresh from the base linear) in place,
        or, with DoRA rows (``dora_rows``: each row's local slot), into zeros and then scaled."""
        if dora_rows is None:
            grouped_lora_add_(y.view(x3.shape[0], 1, self.d_out), x3, groups, self.a_stack, self.b_stack)
            return y
        delta = x3.new_zeros(x3.shape[0], 1, self.d_out)
        grouped_lora_add_(delta, x3, groups, self.a_stack, self.b_stack)
        return self._dora_scaled(y.view(delta.shape), delta, dora_rows).reshape(y.shape)

    def _local_slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's local slot; global slots this module never held (adapters that do not target it, soft
        prompts, no adapter) map to local slot 0, whose stacks are zeros. Device ops only, no host sync."""
        known = rows < self.slot_map.numel()
        return self.slot_map.index_select(0, torch.where(known, rows, torch.zeros_like(rows)))

    # ----------------------------------------------------------- staging
    def stage(self, slab: int, slots: list[int]) -> tuple[object, ...]:
        """Before a slab's batch runs statically: copy what its rows need into the slab's persistent buffers
        (reallocated only when their shape changes) and return that shape; ``()`` when no row of the batch has
        an adapter here (the step skips the module). Host bookkeeping and device copies, no host sync."""
        local = [self._local.get(g, 0) for g in slots]
        present = sorted(set(local) - {0})
        if not present:
            self.unstage(slab)
            return ()
        rank = min(rank_bucket(max(self._ranks[s] for s in present)), self.rank)
        dense = self._context.strategy == "dense"
        places = adapter_bucket(len(present)) if dense else 0
        plan = [] if dense else rank_groups(local, self._ranks, self.rank, bucketed=True)
        kept = not dense and self._context.reserve(slab, self.name, self._group_bytes(plan))
        groups = tuple((len(rows), r, len(rows) == len(slots), kept) for r, rows in plan)
        staged = self._staged.get(slab)
        if staged is None or staged.shape != (len(slots), places, rank, groups):
            staged = Staged(rank, torch.zeros(len(slots), dtype=torch.long, device=self._device))
            if dense:
                staged.a = torch.zeros(places * rank, self.d_in, dtype=self._dtype, device=self._device)
                staged.b = torch.zeros(places * rank, self.d_out, dtype=self._dtype, device=self._device)
                staged.owner = torch.zeros(len(slots), places, dtype=self._dtype, device=self._device)
            else:
                staged.groups = [self._empty_group(len(rows), r, len(rows) == len(slots), kept) for r, rows in plan]
            self._staged[slab] = staged
        rows_local = torch.tensor(local, dtype=torch.long)
        staged.rows_local.copy_(rows_local)
        for group, (_, rows) in zip(staged.groups or [], plan, strict=True):
            self._fill_group(group, rows, [local[i] for i in rows])
        if staged.a is not None and staged.b is not None and staged.owner is not None:
            index = torch.tensor(present + [0] * (places - len(present)), dtype=torch.long)  # slot 0: zeros
            on_device = index.to(self._device)
            staged.a.view(places, rank, self.d_in).copy_(self.a_stack[:, :rank].index_select(0, on_device))
            staged.b.view(places, rank, self.d_out).copy_(self.b_stack[:, :rank].index_select(0, on_device))
            staged.owner.copy_((rows_local[:, None] == index[None, :]) & (index[None, :] != 0))
        return staged.shape

    def unstage(self, slab: int) -> None:
        """Free a slab's buffers (the slab is gone)."""
        self._staged.pop(slab, None)
        self._context.release(slab, self.name)

    def _group_bytes(self, plan: list[tuple[int, list[int]]]) -> int:
        element = torch.empty((), dtype=self._dtype).element_size()
        return sum(len(rows) * rank * (self.d_in + self.d_out) for rank, rows in plan) * element

    def _empty_group(self, count: int, rank: int, every_row: bool, kept: bool) -> Group:
        """A group's persistent buffers (its operands are filled by :meth:`_fill_group`)."""
        device = self._device
        group = Group(rank, torch.zeros(count, dtype=torch.long, device=device),
                      None if every_row else torch.zeros(count, dtype=torch.long, device=device))
        if kept:
            group.a = torch.empty(count, rank, self.d_in, dtype=self._dtype, device=device)
            group.b = torch.empty(count, rank, self.d_out, dtype=self._dtype, device=device)
        return group

    def _fill_group(self, group: Group, rows: list[int], local: list[int]) -> None:
        """Copy the rows' positions, local slots and (when kept) gathered operands into the group's buffers."""
        group.local.copy_(torch.tensor(local, dtype=torch.long))
        if group.rows is not None:
            group.rows.copy_(torch.tensor(rows, dtype=torch.long))
        if group.a is not None and group.b is not None:
            torch.index_select(self.a_stack[:, :group.rank], 0, group.local, out=group.a)
            torch.index_select(self.b_stack[:, :group.rank], 0, group.local, out=group.b)

    def _prepare_batch(self, rows: torch.Tensor) -> None:
        """Once per batch (host-side bookkeeping plus a few device ops, no host sync): the largest rank this
        batch uses here, each row's local slot, and for the dense strategy the batch's adapters concatenated."""
        self._seen_version = self._context.version
        present = sorted({self._local[g] for g in self._context.present if g in self._local})
        self._batch_rank = rank = max((self._ranks[s] for s in present), default=0)
        self._batch_dora = any(s in self._dora for s in present)
        self._dense = None
        if rank == 0:
            return
        local = self._local_slots(rows)  # [B]
        self._rows_local = local
        if self._context.strategy == "gather":
            slots = [self._local.get(g, 0) for g in self._context.rows]
            plan = rank_groups(slots, self._ranks, self.rank, bucketed=False)
            kept = self._context.reserve(DYNAMIC, self.name, self._group_bytes(plan))
            groups = [self._empty_group(len(part), r, len(part) == len(slots), kept) for r, part in plan]
            for group, (_, part) in zip(groups, plan, strict=True):
                self._fill_group(group, part, [slots[i] for i in part])
            self._context.operands[self.name] = groups
        if self._context.strategy == "dense":
            index = torch.tensor(present, dtype=torch.long, device=self._device)
            a_cat = self.a_stack.index_select(0, index)[:, :rank].reshape(-1, self.d_in)  # [P·R, d_in]
            b_cat = self.b_stack.index_select(0, index)[:, :rank].reshape(-1, self.d_out)  # [P·R, d_out]
            owner = (local[:, None] == index[None, :]).to(self._dtype)  # [B, P]
            self._dense = (a_cat, b_cat, owner)

    # ------------------------------------------------------------ residency
    def install(self, global_slot: int, a: torch.Tensor, b_scaled: torch.Tensor,
                dora_g: torch.Tensor | None = None) -> None:
        """Place an adapter's ``A`` ``[r, d_in]`` and ``scale·B`` ``[d_out, r]`` in a free local slot; for DoRA
        also ``g = factor - 1`` ``[d_out]`` (see the module docstring)."""
        rank = int(a.shape[0])
        self._seen_version = -1
        if tuple(a.shape) != (rank, self.d_in) or tuple(b_scaled.shape) != (self.d_out, rank):
            raise ShapeMismatchError(
                f"{self.name}: LoRA A {list(a.shape)} / B {list(b_scaled.shape)} do not fit a {self.d_in}→{self.d_out} "
                "linear", "use an adapter made for this base")
        if dora_g is not None and tuple(dora_g.shape) != (self.d_out,):
            raise ShapeMismatchError(f"{self.name}: DoRA magnitude {list(dora_g.shape)} does not fit a "
                                     f"{self.d_in}→{self.d_out} linear", "use an adapter made for this base")
        if global_slot in self._local:
            self.uninstall(global_slot)
        if rank > self.rank:
            self._resize(rank, self.a_stack.shape[0])
        used = set(self._local.values())
        local = next((s for s in range(1, self.a_stack.shape[0]) if s not in used), None)
        if local is None:  # grow by a few slots, not by doubling: static steps read every slot of the stack
            local = self.a_stack.shape[0]
            self._resize(self.rank, local + SLOT_GROWTH)
        if global_slot >= self.slot_map.numel():
            grown = torch.zeros(2 * global_slot + 2, dtype=torch.long, device=self._device)
            grown[: self.slot_map.numel()] = self.slot_map
            self.slot_map = grown
        self.a_stack[local].zero_()
        self.b_stack[local].zero_()
        self.a_stack[local, :rank].copy_(a)
        self.b_stack[local, :rank].copy_(b_scaled.T)
        self.slot_map[global_slot] = local
        self._local[global_slot] = local
        self._ranks[local] = rank
        if dora_g is not None:
            if self.g_stack is None:
                self.g_stack = torch.zeros(self.a_stack.shape[0], self.d_out, dtype=self._dtype, device=self._device)
                self._context.layout += 1
            self.g_stack[local].copy_(dora_g)
            self._dora.add(local)

    def uninstall(self, global_slot: int) -> None:
        """Drop an adapter; shrink the padded rank when the largest resident adapters are gone."""
        local = self._local.pop(global_slot, None)
        self._seen_version = -1
        if local is None:
            return
        self.slot_map[global_slot] = 0
        self.a_stack[local].zero_()
        self.b_stack[local].zero_()
        self._ranks.pop(local, None)
        if local in self._dora:
            self._dora.discard(local)
            assert self.g_stack is not None
            self.g_stack[local].zero_()
            if not self._dora:
                self.g_stack = None
                self._context.layout += 1
        top = max(self._ranks.values(), default=1)
        if top < self.rank:  # the largest adapter left: shrink, so the stacks hold what the pool budgets
            self._resize(top, self.a_stack.shape[0])

    def _resize(self, rank: int, slots: int) -> None:
        a = torch.zeros(slots, rank, self.d_in, dtype=self._dtype, device=self._device)
        b = torch.zeros(slots, rank, self.d_out, dtype=self._dtype, device=self._device)
        keep_s, keep_r = min(slots, self.a_stack.shape[0]), min(rank, self.rank)
        a[:keep_s, :keep_r] = self.a_stack[:keep_s, :keep_r]
        b[:keep_s, :keep_r] = self.b_stack[:keep_s, :keep_r]
        self.a_stack, self.b_stack, self.rank = a, b, rank
        if self.g_stack is not None and self.g_stack.shape[0] != slots:
            g = torch.zeros(slots, self.d_out, dtype=self._dtype, device=self._device)
            g[:keep_s] = self.g_stack[:keep_s]
            self.g_stack = g
        self._context.layout += 1


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at dotted path ``name``."""
    return model.get_submodule(name)


def wrap(model: nn.Module, name: str, context: BatchContext) -> MultiLoraLinear:
    """Wrap the linear at ``name`` once (idempotent) and return its wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, MultiLoraLinear):
        return module
    wrapper = MultiLoraLinear(module, context, name)
    put_module(model, name, wrapper)
    return wrapper


def put_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` to ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def base_linear(model: nn.Module, name: str) -> nn.Module:
    """The underlying base linear at ``name`` (through a wrapper if there is one)."""
    module = model.get_submodule(name)
    return module.base if isinstance(module, MultiLoraLinear) else module


def wrappers(model: nn.Module) -> list[MultiLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
