"""Base linears whose bf16 weights are laid out for oneDNN once, not on every call (CPU inference).

A bf16 ``F.linear`` on an x86 CPU runs oneDNN's matmul, which first reorders the weight into its blocked layout —
on every call. At a decode step that reorder is a large part of the matmul: a 576→1536 weight at 32 rows took
487 µs cold (the weight out of cache, as in a model) against 346 µs from a weight reordered once, and the tied
576→49152 LM head 16.0 against 11.0 ms (one thread, 5 interleaved rounds, best; ``benchmarks/serving.py`` has the
end-to-end figures). :class:`PackedLinear` is an ``nn.Linear`` that keeps such a reordered copy beside its weight and
answers from it through oneDNN's own linear call, which gives **the same bits** as ``F.linear`` for a contiguous
input (checked for every shape of the engine's models and for 1–2048 rows; :func:`pack_linears` probes it once more
on the machine it runs on and packs nothing where it does not hold).

The copy follows the weight. A :class:`PackedLinear` shares its ``weight`` and ``bias`` Parameters with the module
it replaces, so tied weights stay tied and whatever reads or writes the weight (the merger, a DoRA install,
trainable tokens, ``load_state_dict``) sees the one tensor it always saw. The copy is keyed by the weight's storage
and its version counter, which every in-place write bumps; a call that finds the key changed repacks first
(about a millisecond for a 576×1536 weight), so a merge or an unmerge is in effect from the next step on. Writes
through ``.data`` bypass the counter: nothing in this package writes weights that way, and :meth:`PackedLinear.
repack` is there for code that does.

It answers from the copy only where that is exact: a CPU, a contiguous bf16 input, a bf16 weight, no gradient
wanted, no autocast, not being traced by ``torch.compile``; anything else is plain ``F.linear``. The price is
memory — one more copy of every packed weight (:func:`packed_bytes`; +269 MB for SmolLM2-135M, its tied LM head
included). ``ADAPTERHUB_PACKED_WEIGHTS=off`` keeps every linear plain.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from adapterhub_local.inference.suspension import Suspension

log = logging.getLogger(__name__)

SWITCH_ENV = "ADAPTERHUB_PACKED_WEIGHTS"
"""``off`` (or ``0``/``false``/``no``) keeps every linear plain (``F.linear``, the weight reordered per call)."""
ROWS_HINT = 32
"""The row count oneDNN lays the weight out for (a decode batch). The result bits do not depend on it; the speed
at other row counts barely does (2,048 rows: within 6 % of the plain call, mostly faster)."""
PACKED_DTYPES = (torch.bfloat16,)
"""Where a packed call gives ``F.linear``'s bits. fp32 takes another library's kernel (the last bits differ);
fp16 needs AVX512-FP16 or AVX-NE-CONVERT."""


def _switched_off() -> bool:
    return os.environ.get(SWITCH_ENV, "").strip().lower() in ("off", "0", "false", "no")


class _Probe:
    """Whether packed calls reproduce ``F.linear`` on this machine: checked once per process, on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._done = False

    def reason(self) -> str | None:
        """``None`` where packing is exact here, else why not."""
        with self._lock:
            if not self._done:
                self._reason = self._check()
                self._done = True
            return self._reason

    @staticmethod
    def _check() -> str | None:
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN (mkldnn)"
        try:
            generator = torch.Generator().manual_seed(0)
            weight = torch.randn(48, 40, generator=generator).to(torch.bfloat16)
            bias = torch.randn(48, generator=generator).to(torch.bfloat16)
            packed = _reorder(weight)
            for rows in (1, 3, 32):
                x = torch.randn(rows, 40, generator=generator).to(torch.bfloat16)
                if not torch.equal(_packed_call(x, packed, bias), nn.functional.linear(x, weight, bias)):
                    return f"oneDNN's packed linear does not give F.linear's bits at {rows} row(s) on this CPU"
        except (RuntimeError, AttributeError) as error:
            return f"oneDNN's packed linear is not usable here: {error}"
        return None


_PROBE = _Probe()


def unavailable_reason() -> str | None:
    """``None`` where :func:`pack_linears` packs, else the reason it packs nothing."""
    if _switched_off():
        return f"disabled by {SWITCH_ENV}"
    return _PROBE.reason()


_SUSPENSION = Suspension()


def suspended() -> AbstractContextManager[None]:
    """Within this block (this process, every thread) packed layers call plain ``F.linear``: the side-by-side
    baseline of ``benchmarks/serving.py``."""
    return _SUSPENSION.block()


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable inside and outside inference mode
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
    return packed


def _packed_call(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


class _PackedCopy:
    """A weight's reordered copy and the key it was made under; a deep copy of a module starts without one."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.key: tuple[int, int] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _PackedCopy:
        return _PackedCopy()


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same Parameters as the one it replaces) that multiplies by a prepacked bf16 copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                         dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.train(linear.training)
        self._copy = _PackedCopy()

    def _key(self) -> tuple[int, int]:
        return self.weight.data_ptr(), self.weight._version

    def repack(self) -> None:
        """Lay the weight out again now (for code that changed it without bumping its version: ``.data`` writes)."""
        self._copy.tensor = _reorder(self.weight)
        self._copy.key = self._key()

    @property
    def packed_bytes(self) -> int:
        """Bytes the packed copy holds (0 before the first packed call)."""
        return 0 if self._copy.tensor is None else self.weight.numel() * self.weight.element_size()

    def _exact(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (not _SUSPENSION.active and x.device.type == "cpu" and weight.device.type == "cpu"
                and x.dtype == weight.dtype and weight.dtype in PACKED_DTYPES and x.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._exact(x):
            return super().forward(x)
        if self._copy.key != self._key():
            self.repack()
        assert self._copy.tensor is not None
        return _packed_call(x, self._copy.tensor, self.bias)


def _swap_in(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Put a :class:`PackedLinear` (packed now) in place of every plain bf16 CPU ``nn.Linear``; the originals.
    A linear with forward hooks stays as it is (a replacement would not run them)."""
    if unavailable_reason() is not None:
        log.info("packed weights off: %s", unavailable_reason())
        return []
    swaps = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.Linear and module.weight.device.type == "cpu"
             and module.weight.dtype in PACKED_DTYPES and not _hooked(module)]
    for name, module in swaps:
        packed = PackedLinear(module)
        packed.repack()
        _put(model, name, packed)
    return swaps


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def pack_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` whose weight is bf16 on a CPU with a :class:`PackedLinear`
    (sharing its Parameters) and pack each once now; returns how many were packed (0 where packing is off or
    inexact here: :func:`unavailable_reason` says why)."""
    return len(_swap_in(model))


@contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """:func:`pack_linears` for the block only (a model that is also trained: evaluation's ``generate``); on exit
    the original modules are back and the copies freed. Hooks registered on a linear inside the block stay with
    the packed module; enter this before registering any (the original modules keep theirs)."""
    swaps = _swap_in(model)
    try:
        yield len(swaps)
    finally:
        for name, module in swaps:
            _put(model, name, module)


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the packed copies of ``model``'s linears (each weight's size: tied weights count per module)."""
    return sum(module.packed_bytes for module in model.modules() if isinstance(module, PackedLinear))
