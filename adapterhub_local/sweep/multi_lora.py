"""Many LoRA adapters trained at once on one frozen base, each on its own slice of one batch (as mLoRA does).

The batch is the concatenation of every adapter's own batch along dim 0; adapter ``i`` owns rows
``[start_i, end_i)``. Each adapted linear runs the frozen base weight **once** over the whole batch and adds,
row slice by row slice, that slice's own update ``scale_i · B_i(A_i(dropout_i(x)))`` — the same operations,
in the same order, as PEFT's ``lora.Linear`` — so adapter ``i`` sees exactly what it would see alone.
Modules PEFT trains in full beside LoRA (``modules_to_save``, e.g. a classifier head) get one copy per
adapter, each applied to its own slice. Parameters of different adapters never meet, so the gradient of
the summed per-adapter losses is, for each adapter, its own loss's gradient.
"""

from __future__ import annotations

import copy
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


def _features(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``[d_in, d_out]``)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        shape = next(base.parameters()).shape  # Conv1D weight [d_in, d_out]
        return int(shape[0]), int(shape[1])
    raise UnsupportedError(f"cannot adapt a {type(base).__name__}", "target nn.Linear (or GPT-2 Conv1D) modules")


class Segments:
    """The row ranges of the current batch, shared by every wrapped module of one joint model."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.sizes: list[int] = []
        self.solo: int | None = None
        self._ranges: list[tuple[int, int]] = []

    @contextmanager
    def use(self, sizes: list[int]) -> Iterator[None]:
        """Within the block, adapter ``i`` owns the next ``sizes[i]`` rows of every batch."""
        if len(sizes) != self.count:
            raise UnsupportedError(f"{len(sizes)} batch sizes for {self.count} adapters", "give one per adapter")
        self.sizes = list(sizes)
        # Computed once per batch, not once per wrapped module.
        starts = [sum(self.sizes[:i]) for i in range(self.count)]
        self._ranges = [(s, s + n) for s, n in zip(starts, self.sizes, strict=True)]
        try:
            yield
        finally:
            self.sizes, self._ranges = [], []

    @contextmanager
    def only(self, index: int) -> Iterator[None]:
        """Within the block, every row of any batch belongs to adapter ``index`` (evaluation, generation)."""
        self.solo = index
        try:
            yield
        finally:
            self.solo = None

    def ranges(self, rows: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each adapter for a batch of ``rows`` rows."""
        if self.solo is not None:
            return [(0, rows) if i == self.solo else (0, 0) for i in range(self.count)]
        if not self.sizes:
            raise UnsupportedError("multi-adapter forward without row segments",
                                   "call inside `segments.use(sizes)` or `segments.only(index)`")
        if sum(self.sizes) != rows:
            raise UnsupportedError(f"segments cover {sum(self.sizes)} rows, the batch has {rows}",
                                   "give every adapter's batch size to `segments.use`")
        return self._ranges


class MultiLoraLinear(nn.Module):
    """A frozen linear plus ``len(slots)`` LoRA adapters, adapter ``i`` applied to segment ``i`` only."""

    def __init__(self, base: nn.Module, slots: list[Slot], segments: Segments) -> None:
        super().__init__()
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.slots = list(slots)
        self.segments = segments
        d_in, d_out = _features(base)
        weight = next(base.parameters())
        # Adapters stay fp32 over a bf16/fp16 base (as PEFT's autocast_adapter_dtype): they are trained.
        dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        # Same shapes as PEFT's lora_A / lora_B linears: A [r, d_in], B [d_out, r].
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(s.rank, d_in, dtype=dtype, device=weight.device)) for s in slots
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(d_out, s.rank, dtype=dtype, device=weight.device)) for s in slots
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        pieces = []
        for i, (start, end) in enumerate(self.segments.ranges(x.shape[0])):
            if start == end:
                continue
            slot = self.slots[i]
            rows = x[start:end]
            dropped = F.dropout(rows, p=slot.dropout, training=self.training) if slot.dropout > 0 else rows
            # PEFT: result + lora_B(lora_A(dropout(x))) * scaling, input cast to the LoRA weight's dtype.
            update = F.linear(F.linear(dropped.to(self.lora_A[i].dtype), self.lora_A[i]), self.lora_B[i])
            pieces.append(result[start:end] + (update * slot.scale).to(result.dtype))
        return torch.cat(pieces, dim=0)


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

    def named_parameters_of(self, index: int, prefix: str = "base_model.model.") -> dict[str, nn.Parameter]:
        """Adapter ``index``'s trainable parameters under PEFT's saved key names (``save_pretrained``)."""
        out: dict[str, nn.Parameter] = {}
        for path, module in self.lora_modules.items():
            out[f"{prefix}{path}.lora_A.weight"] = module.lora_A[index]
            out[f"{prefix}{path}.lora_B.weight"] = module.lora_B[index]
        for path, saved in self.saved_modules.items():
            for name, param in saved.copies[index].named_parameters():
                out[f"{prefix}{path}.{name}"] = param
        return out

    def parameters_of(self, index: int) -> list[nn.Parameter]:
        """Adapter ``index``'s trainable parameters (A, B of every module, then its head copies)."""
        return list(self.named_parameters_of(index).values())

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
    segments = Segments(len(slots))
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
