"""Contiguous inputs for the LM head while Hugging Face ``generate`` runs.

``generate`` asks the model for the last position's logits only (``logits_to_keep=1``), and the model slices
its hidden states to ``[rows, 1, hidden]`` — a view that is not contiguous. When the head's weight does not
require a gradient (a frozen base: every PEFT model, every evaluation of an adapter), torch's CPU ``matmul``
does not fold that view into one matrix product: it broadcasts the weight to ``[rows, hidden, vocab]``, copies
it, and runs a batched product (pytorch/pytorch#151934; a fix is open as #197851). On SmolLM2-135M's head
(49,152 × 576, bf16, one thread) that is 1.6 s for a 16-row prefill, 3–4 s for 32 rows and 5.6 s for 48 (beam
search, 3 beams × 16 prompts), against 12–23 ms for the same product on a contiguous copy of the
``rows × hidden`` input, with bit-identical bf16 logits (fp32 differs in the last bits: another kernel). A head
whose weight requires a gradient (a plain model fresh from ``from_pretrained``) takes the fast path already.

:func:`contiguous_head_inputs` hooks the LM head for the duration of a ``generate`` call and hands it a
contiguous input; the decode steps' inputs are contiguous already and pass through untouched. Our own engine
avoids the slice altogether (``generation.last_position``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _contiguous_first_argument(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that turns hidden states into vocabulary logits (through a PEFT wrapper), or ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def contiguous_head_inputs(model: nn.Module) -> Iterator[None]:
    """Within the block, the LM head of ``model`` always multiplies a contiguous input (no-op for a model
    without one)."""
    head = output_head(model)
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_first_argument)
    try:
        yield
    finally:
        handle.remove()
