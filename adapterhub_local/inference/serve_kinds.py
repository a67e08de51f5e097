"""Swap-mode residency of an adapter's embedding parts (embedding LoRA, trainable tokens), and the list of
every module that stages per-batch operands for static decoding (LoRA linears and embeddings alike).

Module copies (``modules_to_save`` other than a classifier head) are not served per row: installing an adapter
that carries one raises :class:`UnsupportedError` with the reason and the fix (merge mode swaps the copy in).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference.adapters import PreparedAdapter
from adapterhub_local.inference.multi_embedding import embedding_wrappers, wrap_embedding
from adapterhub_local.inference.multi_lora import BatchContext, wrappers


class Staging(Protocol):
    """What the static decoders drive on every adapted module."""

    @property
    def stack_bytes(self) -> int: ...

    def stage(self, slab: int, slots: list[int]) -> tuple[object, ...]: ...

    def unstage(self, slab: int) -> None: ...


def staged_modules(model: nn.Module) -> list[Staging]:
    """Every multi-adapter module of ``model``: LoRA linears, then embeddings."""
    return [*wrappers(model), *embedding_wrappers(model)]


def refuse_swap(adapter: PreparedAdapter) -> None:
    """Raise :class:`UnsupportedError` if swap mode cannot serve ``adapter`` per row."""
    reason = adapter.extras.swap_refusal
    if reason is not None:
        raise UnsupportedError(f"adapter {adapter.ref} cannot be served per row in swap mode: {reason}",
                               "serve it with mode='merge' (or 'auto', which merges while it carries the traffic)")


def install_extras(model: nn.Module, context: BatchContext, slot: int, adapter: PreparedAdapter,
                   device: torch.device, dtype: torch.dtype) -> None:
    """Place the adapter's embedding LoRAs and trainable tokens in their embeddings' per-row stacks (call
    :func:`refuse_swap` before installing any of the adapter's parts)."""
    extras = adapter.extras
    for name in sorted(set(extras.embeddings) | set(extras.tokens)):
        pair = extras.embeddings.get(name)
        lora = None
        if pair is not None:
            b_scaled = (pair.b.to(torch.float32) * pair.scale).to(device, dtype)
            lora = (pair.a.to(device, dtype), b_scaled)
        tokens = extras.tokens.get(name)
        rows = None if tokens is None else (tokens.ids.to(device), tokens.rows.to(device, dtype))
        wrap_embedding(model, name, context).install(slot, lora, rows)


def uninstall_extras(model: nn.Module, context: BatchContext, slot: int, adapter: PreparedAdapter) -> None:
    for name in sorted(set(adapter.extras.embeddings) | set(adapter.extras.tokens)):
        wrap_embedding(model, name, context).uninstall(slot)
