"""FSDP for training: the frozen base and its LoRA tensors sharded across the processes with PyTorch's FSDP2
(:func:`torch.distributed.fsdp.fully_shard`), which runs over gloo on CPUs as over NCCL on GPUs.

Chosen with ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N -m adapterhub_local train RECIPE``
(``distributed.py`` reads the choice; Accelerate's own FSDP preparation is GPU-only, so the wrapping is done here,
the way Accelerate's ``TRANSFORMER_BASED_WRAP`` policy does it): every transformer block (the model's
``_no_split_modules`` classes) is one FSDP unit, its base weights and its LoRA A/B together, and the rest of the
model (embeddings, final norm, head) is the root unit. A block's weights are gathered for its forward and
backward only, so a process holds ``1/N`` of the model plus one block at a time.

What the rest of training needs from here: the full value of a sharded tensor (:func:`full`, a collective: every
process must call it, in the same order), a full tensor sharded back the way a parameter is (:func:`like`), the
optimizer state in the one-process layout (:func:`full_optimizer_state`) and back (:func:`reshard_optimizer_state`),
so checkpoints are the same files whatever N or the strategy, and gradient synchronisation switched off on the
micro-batches that are not the last of an accumulation group (:func:`no_sync`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from adapterhub_local.config import MUTATING_INITS
from adapterhub_local.errors import UnsupportedError

FSDP_METHODS = ("lora",)
"""Methods trained under FSDP: the result is a PEFT adapter gathered from the shards (a whole-model result would be
gathered in full on the main process, which defeats the point of FSDP)."""


def check_supported(method: str, precision: str, init: str = "default") -> None:
    """Refuse what FSDP training does not do here, with what to use instead."""
    problems = []
    if method not in FSDP_METHODS:
        problems.append(f"method {method!r} (FSDP trains {', '.join(FSDP_METHODS)})")
    if precision == "fp16":
        problems.append("precision fp16 (its loss scaling is Accelerate's, which is not used under FSDP here)")
    if init in MUTATING_INITS:  # PEFT's conversion to the unchanged base reads the whole model's state, not ours
        problems.append(f"init {init!r} (its adapter is converted at save time from the whole model's state)")
    if problems:
        raise UnsupportedError(f"FSDP training does not support {'; '.join(problems)}",
                               "train with method lora, init default, gaussian or eva and precision bf16, fp32 or "
                               "auto under FSDP, or with DDP (`accelerate launch --multi_gpu`)")


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: submodules whose class a transformers model names in ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def shard(model: torch.nn.Module) -> int:
    """Shard ``model`` in place (blocks, then the root); returns the number of block units. FSDP moves each unit to
    the process's device as it shards it, so the whole model never sits on one device. The processes must hold the
    same values beforehand: they load the same files and seed identically (a newly initialised head or LoRA tensor
    is the same everywhere), as there is no DDP-style broadcast of whole tensors here. ``generate`` becomes an FSDP
    forward method, so generation gathers the root's weights as a forward does."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    if callable(getattr(model, "generate", None)):
        register_fsdp_forward_method(model, "generate")
    return len(blocks)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process if sharded: a collective)."""
    if is_sharded(tensor):
        gathered: torch.Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return gathered
    return tensor


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param`` is: this process's shard of it if ``param`` is sharded."""
    value = value.to(param.device, param.dtype)
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    sharded: Any = param
    return distribute_tensor(value, sharded.device_mesh, sharded.placements)


def full_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with every sharded state tensor gathered (a collective when sharded): the
    one-process layout."""
    state = {key: {name: full(value) if isinstance(value, torch.Tensor) else value for name, value in entry.items()}
             for key, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a one-process state: shard each whole state tensor as its parameter is."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = optimizer.state.get(param)
            if not entry or not is_sharded(param):
                continue
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.dim() > 0:
                    entry[name] = like(param, value)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients unreduced (FSDP2's ``set_requires_gradient_sync``)."""
    sharded: Any = model
    sharded.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        sharded.set_requires_gradient_sync(True)
