"""Many LoRA adapters trained at once on one frozen base, each on its own slice of one batch (as mLoRA does).

The batch is the concatenation of every adapter's own batch along dim 0; adapter ``i`` owns rows
``[start_i, end_i)``. Each adapted linear runs the frozen base weight **once** over the whole batch and adds to
each row its own adapter's update ``scale_i · B_i(A_i(dropout(x)))`` — PEFT's ``lora.Linear`` arithmetic — so
adapter ``i`` sees what it would see alone.

No Python loop over adapters per module: adapters are partitioned once into **rank groups** (:func:`rank_groups`,
a few groups whatever the number of adapters), each group's A and B matrices are one stacked parameter padded to
the group's largest rank (``A [n, r, d_in]``, ``B [n, d_out, r]``, the padding zero), and a module's update is
one pair of batched matmuls per group over segment-aligned rows (row indices prepared once per batch by
:class:`Segments`, not per module). Padding stays exactly zero in training: a padded row of A meets a zero
column of B, so both get zero gradients (and AdamW moves a parameter with zero gradient and zero state by
zero). Modules PEFT trains in full beside LoRA (``modules_to_save``, e.g. a classifier head) get one copy per
adapter, each applied to its own slice. Parameters of different adapters never meet, so the gradient of the
summed per-adapter losses is, for each adapter, its own loss's gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapterhub_local import runtime
from adapterhub_local.errors import UnsupportedError


@dataclass(frozen=True)
class Slot:
    """One adapter's place in the joint model: its rank, scale and dropout."""

    rank: int
    scale: float
    dropout: float = 0.0


GROUP_COST_FRACTION = 1 / 16
"""What one more rank group costs, as a fraction of the sum of the ranks (in padded rank units): the
partition trades padding (wasted multiply-adds) against extra batched-matmul calls."""


def rank_groups(ranks: list[int]) -> list[list[int]]:
    """Partition adapter indices into groups that share one padded rank (the group's largest).

    Groups are runs of the adapters sorted by rank, chosen (dynamic programming) to minimise the padded rank
    total plus a fixed cost per group (:data:`GROUP_COST_FRACTION`): equal ranks always share a group, small
    ranks pad up together, large ones stay apart. Ranks 1, 2, 4, …, 1024 make 5 groups; any number of seeds
    of them, still 5."""
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    penalty = max(1.0, GROUP_COST_FRACTION * sum(ranks))
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * ranks[order[j - 1]] + penalty
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _features(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``[d_in, d_out]``)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        shape = next(base.parameters()).shape  # Conv1D weight [d_in, d_out]
        return int(shape[0]), int(shape[1])
    raise UnsupportedError(f"cannot adapt a {type(base).__name__}", "target nn.Linear (or GPT-2 Conv1D) modules")


@dataclass(frozen=True)
class GroupRows:
    """Where one rank group's adapters sit in the current batch.

    ``members``: the group-local indices of its adapters that have rows (``count`` of them, known on the host
    so nothing is read back from the device); ``rows``: batch row indices, each member's rows padded to
    ``width`` by repeating its last row, member by member; ``keep``: the positions in ``rows`` that are real
    and ``targets`` their batch rows (both ``None`` when nothing is padded); ``whole``: the group covers the
    batch in order, so ``x`` needs no gathering and the update no scattering."""

    members: torch.Tensor
    rows: torch.Tensor
    keep: torch.Tensor | None
    targets: torch.Tensor
    width: int
    count: int
    whole: bool

    def to(self, device: torch.device) -> GroupRows:
        if self.rows.device == device:
            return self
        keep = None if self.keep is None else self.keep.to(device, non_blocking=True)
        return GroupRows(self.members.to(device, non_blocking=True), self.rows.to(device, non_blocking=True), keep,
                         self.targets.to(device, non_blocking=True), self.width, self.count, self.whole)


class Segments:
    """The row ranges of the current batch, shared by every wrapped module of one joint model, and each rank
    group's row indices derived from them (once per batch, not once per module)."""

    def __init__(self, count: int, groups: list[list[int]] | None = None) -> None:
        self.count = count
        self.groups = groups if groups is not None else [[i] for i in range(count)]
        self.sizes: list[int] = []
        self.solo: int | None = None
        self._ranges: list[tuple[int, int]] = []
        self._plan: list[GroupRows | None] = []
        self._tiles: list[tuple[int, int, int]] | None = None
        self._plan_device: dict[torch.device, list[GroupRows | None]] = {}

    @contextmanager
    def use(self, sizes: list[int]) -> Iterator[None]:
        """Within the block, adapter ``i`` owns the next ``sizes[i]`` rows of every batch."""
        if len(sizes) != self.count:
            raise UnsupportedError(f"{len(sizes)} batch sizes for {self.count} adapters", "give one per adapter")
        self.sizes = list(sizes)
        starts = [sum(self.sizes[:i]) for i in range(self.count)]
        self._ranges = [(s, s + n) for s, n in zip(starts, self.sizes, strict=True)]
        self._set_plan(self._ranges, sum(self.sizes))
        try:
            yield
        finally:
            self.sizes, self._ranges = [], []
            self._set_plan([], 0)

    @contextmanager
    def only(self, index: int) -> Iterator[None]:
        """Within the block, every row of any batch belongs to adapter ``index`` (evaluation, generation)."""
        self.solo = index
        try:
            yield
        finally:
            self.solo = None

    def _set_plan(self, ranges: list[tuple[int, int]], total: int) -> None:
        self._plan = [self._group_rows(group, ranges, total) for group in self.groups] if ranges else []
        self._plan_device = {}
        self._tiles = self._tiling(ranges, total) if ranges else None

    def _tiling(self, ranges: list[tuple[int, int]], total: int) -> list[tuple[int, int, int]] | None:
        """``(group, start, end)`` in batch order when every group's rows are one unpadded run and the runs
        tile the batch (adapters concatenated group by group, equal batch sizes within a group — the sweep's
        usual layout): then each group reads a view of ``x`` and the output is one ``cat``, no gather/scatter."""
        tiles = []
        for g, rows in enumerate(self._plan):
            if rows is None:
                continue
            if rows.keep is not None:
                return None
            members = [self.groups[g][m] for m in rows.members.tolist()]
            start, end = ranges[members[0]][0], ranges[members[-1]][1]
            if end - start != rows.count * rows.width or any(
                    ranges[i][0] != start + k * rows.width for k, i in enumerate(members)):
                return None
            tiles.append((g, start, end))
        tiles.sort(key=lambda t: t[1])
        position = 0
        for _, start, end in tiles:
            if start != position:
                return None
            position = end
        return tiles if position == total else None

    def tiles(self, rows: int) -> list[tuple[int, int, int]] | None:
        """The batch's tiling by rank group (see :meth:`_tiling`), or ``None`` where it has none."""
        if self.solo is not None:
            return None
        self._check(rows)
        return self._tiles

    @staticmethod
    def _group_rows(group: list[int], ranges: list[tuple[int, int]], total: int) -> GroupRows | None:
        spans = [(local, ranges[i]) for local, i in enumerate(group) if ranges[i][1] > ranges[i][0]]
        if not spans:
            return None
        width = max(e - s for _, (s, e) in spans)
        rows: list[int] = []
        keep: list[int] = []
        for _, (s, e) in spans:
            keep.extend(range(len(rows), len(rows) + e - s))
            rows.extend([*range(s, e), *[e - 1] * (width - (e - s))])
        padded = len(keep) != len(rows)
        targets = [rows[k] for k in keep]
        return GroupRows(torch.tensor([local for local, _ in spans]), torch.tensor(rows),
                         torch.tensor(keep) if padded else None, torch.tensor(targets), width, len(spans),
                         not padded and targets == list(range(total)))

    def _check(self, rows: int) -> None:
        if not self.sizes:
            raise UnsupportedError("multi-adapter forward without row segments",
                                   "call inside `segments.use(sizes)` or `segments.only(index)`")
        if sum(self.sizes) != rows:
            raise UnsupportedError(f"segments cover {sum(self.sizes)} rows, the batch has {rows}",
                                   "give every adapter's batch size to `segments.use`")

    def ranges(self, rows: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each adapter for a batch of ``rows`` rows."""
        if self.solo is not None:
            return [(0, rows) if i == self.solo else (0, 0) for i in range(self.count)]
        self._check(rows)
        return self._ranges

    def plan(self, rows: int, device: torch.device) -> list[GroupRows | None]:
        """Each rank group's rows in a batch of ``rows`` rows (``None`` for a group with none), on ``device``."""
        if self.solo is not None:
            return [self._solo_rows(group, rows, device) for group in self.groups]
        self._check(rows)
        if device not in self._plan_device:
            self._plan_device[device] = [None if p is None else p.to(device) for p in self._plan]
        return self._plan_device[device]

    def _solo_rows(self, group: list[int], rows: int, device: torch.device) -> GroupRows | None:
        if self.solo not in group:
            return None
        members = torch.tensor([group.index(self.solo)], device=device)
        everything = torch.arange(rows, device=device)
        return GroupRows(members, everything, None, everything, rows, 1, True)


class MultiLoraLinear(nn.Module):
    """A frozen linear plus LoRA adapters stacked by rank group (see the module docstring); adapter ``i``
    applies to its own segment only."""

    def __init__(self, base: nn.Module, slots: list[Slot], segments: Segments) -> None:
        super().__init__()
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.slots = list(slots)
        self.segments = segments
        if len({s.dropout for s in slots}) > 1:
            raise UnsupportedError("adapters of one joint model with different LoRA dropout",
                                   "give every adapter the same method.dropout")
        self.dropout = slots[0].dropout if slots else 0.0
        d_in, d_out = _features(base)
        weight = next(base.parameters())
        # Adapters stay fp32 over a bf16/fp16 base (as PEFT's autocast_adapter_dtype): they are trained.
        dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        # Group g: A [n_g, r_g, d_in], B [n_g, d_out, r_g] — PEFT's lora_A / lora_B shapes, stacked and padded.
        padded = [max(slots[i].rank for i in group) for group in segments.groups]
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(len(g), r, d_in, dtype=dtype, device=weight.device))
            for g, r in zip(segments.groups, padded, strict=True))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(len(g), d_out, r, dtype=dtype, device=weight.device))
            for g, r in zip(segments.groups, padded, strict=True))
        for g, group in enumerate(segments.groups):
            self.register_buffer(f"scales_{g}", torch.tensor([slots[i].scale for i in group], dtype=torch.float32,
                                                             device=weight.device), persistent=False)
        self._where = {i: (g, local) for g, group in enumerate(segments.groups) for local, i in enumerate(group)}

    def adapter_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``index``'s ``(A [r, d_in], B [d_out, r])``: views into the stacked parameters."""
        g, local = self._where[index]
        rank = self.slots[index].rank
        return self.lora_A[g][local, :rank], self.lora_B[g][local, :, :rank]

    def adapter_grads(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradients of :meth:`adapter_weights` (views), ``None`` before a backward reached them."""
        g, local = self._where[index]
        rank = self.slots[index].rank
        grad_a, grad_b = self.lora_A[g].grad, self.lora_B[g].grad
        return (None if grad_a is None else grad_a[local, :rank],
                None if grad_b is None else grad_b[local, :, :rank])

    def group_members(self, group: int) -> list[int]:
        """Adapter indices stacked, in order, in group ``group``'s parameters."""
        return list(self.segments.groups[group])

    def _update(self, g: int, rows: GroupRows, x: torch.Tensor) -> torch.Tensor:
        """Group ``g``'s LoRA update of its rows ``x`` (already gathered: ``[count · width, …, d_in]``)."""
        a, b, scales = self.lora_A[g], self.lora_B[g], getattr(self, f"scales_{g}")
        if rows.count != a.shape[0]:  # some of the group's adapters have no rows in this batch
            a, b, scales = (t.index_select(0, rows.members) for t in (a, b, scales))
        # PEFT: result + lora_B(lora_A(dropout(x))) * scaling, input cast to the LoRA weight's dtype — except
        # under autocast, where bmm casts it back to the compute dtype anyway (the round trip is exact).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        picked = x.reshape(rows.count, -1, x.shape[-1])
        if self.dropout > 0:
            picked = F.dropout(picked, p=self.dropout, training=self.training)
        update = torch.bmm(torch.bmm(picked, a.transpose(1, 2)), b.transpose(1, 2)) * scales.view(-1, 1, 1)
        return update.reshape(*x.shape[:-1], update.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        plan = self.segments.plan(x.shape[0], x.device)
        tiles = self.segments.tiles(x.shape[0])
        if tiles is not None:  # each group a view of x, one cat (rank groups, not adapters)
            pieces = [result[s:e] + self._update(g, plan[g], x[s:e]).to(result.dtype)  # type: ignore[arg-type]
                      for g, s, e in tiles]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        out = result
        for g, rows in enumerate(plan):  # rank groups, not adapters
            if rows is None:
                continue
            picked = x if rows.whole else x.index_select(0, rows.rows)
            update = self._update(g, rows, picked).to(result.dtype)
            if rows.whole:
                out = out + update
            else:
                if rows.keep is not None:
                    update = update.index_select(0, rows.keep)
                out = out.index_add(0, rows.targets, update)
        return out


class MultiCopyModule(nn.Module):
    """One trainable copy of a module per adapter (PEFT's ``modules_to_save``), copy ``i`` on segment ``i``."""

    def __init__(self, original: nn.Module, count: int, segments: Segments) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(original) for _ in range(count))
        for module in self.copies:
            module.requires_grad_(True)
            runtime.upcast_trainable(module)  # trained copies are fp32 whatever the base's dtype
        self.segments = segments

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ranges = self.segments.ranges(x.shape[0])
        return torch.cat([m(x[s:e], *args, **kwargs) for m, (s, e) in zip(self.copies, ranges, strict=True)
                          if e > s], 0)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths whose last component is one of ``targets`` (PEFT's plain-name matching)."""
    wanted = set(targets)
    return [name for name, _ in model.named_modules() if name and name.rsplit(".", 1)[-1] in wanted]


@dataclass
class JointModel:
    """A base with every target wrapped for ``len(slots)`` adapters; ``model`` is the (modified) base."""

    model: nn.Module
    slots: list[Slot]
    segments: Segments
    lora_modules: dict[str, MultiLoraLinear]
    saved_modules: dict[str, MultiCopyModule]

    def named_parameters_of(self, index: int, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
        """Adapter ``index``'s trainable tensors under PEFT's saved key names (``save_pretrained``): views into
        the stacked LoRA parameters, then its head copies' parameters."""
        out: dict[str, torch.Tensor] = {}
        for path, module in self.lora_modules.items():
            a, b = module.adapter_weights(index)
            out[f"{prefix}{path}.lora_A.weight"], out[f"{prefix}{path}.lora_B.weight"] = a, b
        for path, saved in self.saved_modules.items():
            for name, param in saved.copies[index].named_parameters():
                out[f"{prefix}{path}.{name}"] = param
        return out

    def gradients_of(self, index: int, prefix: str = "base_model.model.") -> dict[str, torch.Tensor | None]:
        """The gradients of :meth:`named_parameters_of` (``None`` where no backward reached one)."""
        out: dict[str, torch.Tensor | None] = {}
        for path, module in self.lora_modules.items():
            a, b = module.adapter_grads(index)
            out[f"{prefix}{path}.lora_A.weight"], out[f"{prefix}{path}.lora_B.weight"] = a, b
        for path, saved in self.saved_modules.items():
            for name, param in saved.copies[index].named_parameters():
                out[f"{prefix}{path}.{name}"] = param.grad
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trainable leaf of the joint model: the stacked LoRA parameters, then the head copies'."""
        out: list[nn.Parameter] = []
        for module in self.lora_modules.values():
            out.extend([*module.lora_A, *module.lora_B])
        for saved in self.saved_modules.values():
            out.extend(saved.parameters())
        return out

    def clip_grad_norms_(self, max_norm: float) -> torch.Tensor:
        """Each adapter's gradient clipped to norm ``max_norm`` on its own, as ``clip_grad_norm_`` over that
        adapter's parameters alone would (padding gradients are zero, so they add nothing); returns the
        per-adapter norms before clipping. One reduction per stacked parameter, not per adapter."""
        squares: torch.Tensor | None = None
        stacked: list[tuple[torch.Tensor, torch.Tensor]] = []
        for module in self.lora_modules.values():
            for g, group in enumerate(self.segments.groups):
                members = torch.tensor(group)
                for param in (module.lora_A[g], module.lora_B[g]):
                    if param.grad is None:
                        continue
                    members = members.to(param.grad.device)
                    per = param.grad.float().pow(2).sum(dim=(1, 2))
                    if squares is None:
                        squares = torch.zeros(len(self.slots), device=per.device)
                    squares = squares.index_add(0, members, per)
                    stacked.append((param.grad, members))
        heads = [(i, p.grad) for saved in self.saved_modules.values() for i, copy_ in enumerate(saved.copies)
                 for p in copy_.parameters() if p.grad is not None]
        for i, grad in heads:
            if squares is None:
                squares = torch.zeros(len(self.slots), device=grad.device)
            squares[i] += grad.float().pow(2).sum()
        if squares is None:
            return torch.zeros(len(self.slots))
        norms = squares.sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s formula
        for grad, members in stacked:
            grad.mul_(coef.index_select(0, members).view(-1, 1, 1).to(grad.dtype))
        for i, grad in heads:
            grad.mul_(coef[i].to(grad.dtype))
        return norms

    def load_peft_state(self, index: int, state: dict[str, torch.Tensor], prefix: str = "base_model.model.") -> None:
        """Fill adapter ``index`` from a PEFT state dict (``save_pretrained`` key names)."""
        params = self.named_parameters_of(index, prefix)
        missing = sorted(set(params) - set(state))
        if missing:
            raise UnsupportedError(f"the adapter state lacks {missing[:3]}", "build it with the same targets")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key])

    def peft_state(self, index: int, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
        """Adapter ``index`` as a PEFT state dict, ready for ``adapter_model.safetensors``."""
        return {k: p.detach().clone().contiguous() for k, p in self.named_parameters_of(index, prefix).items()}


def build_joint_model(base: nn.Module, targets: list[str], slots: list[Slot],
                      modules_to_save: list[str] | None = None) -> JointModel:
    """Freeze ``base`` and wrap its target linears (and ``modules_to_save``) for ``len(slots)`` adapters."""
    if not slots:
        raise UnsupportedError("no adapters to train", "give at least one rank")
    base.requires_grad_(False)
    segments = Segments(len(slots), rank_groups([s.rank for s in slots]))
    paths = target_paths(base, targets)
    if not paths:
        raise UnsupportedError(f"no module of the base is named one of {targets}", "fix method.target_modules")
    lora_modules: dict[str, MultiLoraLinear] = {}
    for path in paths:
        wrapped = MultiLoraLinear(base.get_submodule(path), slots, segments)
        _set_submodule(base, path, wrapped)
        lora_modules[path] = wrapped
    saved: dict[str, MultiCopyModule] = {}
    for path in target_paths(base, list(modules_to_save or [])):
        copies = MultiCopyModule(base.get_submodule(path), len(slots), segments)
        _set_submodule(base, path, copies)
        saved[path] = copies
    return JointModel(base, list(slots), segments, lora_modules, saved)
