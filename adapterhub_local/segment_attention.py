"""Attention inside a padding-free training row: several sequences laid end to end in one row, each attending
only to itself, at the cost of attending a padded batch — not of one long row.

A padding-free batch (:mod:`adapterhub_local.train.padding_free`) runs the linear layers, norms and MLPs on the
real tokens only (no padding rows); attention alone needs the sequences apart. The batch carries two index
tensors, passed by transformers from the model's forward down to the attention function as keyword arguments:

* :data:`SLOTS` (``[rows, width]``): for each position of a right-padded ``rows × width`` layout, the row
  position of its token (padding slots point at any token of their sequence: causal attention never lets a real
  query see them, and their outputs are dropped);
* :data:`TOKENS` (``[tokens]``): for each token of the row, its slot in that layout, flattened.

:func:`segment_attention` gathers the queries, keys and values into the padded layout, runs transformers'
causal attention in that layout, and gathers the outputs back. A single row of every sequence with
transformers' block-diagonal mask would give the same result at ``tokens²`` instead of ``rows × width²`` attention
work (about 4× more at batch 8 of lengths 40–100). The gathers are a few copies of the attention inputs; their
backward is a scatter-add.

The attention itself: on CPU at short widths (``runtime.SHORT_ATTENTION_WIDTH``), :func:`grouped_causal_attention`
— two batched matmuls in the inputs' dtype, the scores upcast to fp32 for the mask and softmax, grouped-query heads
matched to their key/value head by a reshape instead of copying keys and values per query head. ``sdpa``'s math
kernel, the loop's choice there before, copies keys and values to every query head, runs its matmuls in fp32 and
adds a fully-masked-row check; the CPU flash kernel's backward is slower still at these widths. Forward and
backward of one SmolLM2 layer (8 × 9 heads × 100 positions, bf16, compiled, one thread): 8.2 ms against 12.3 ms
(math) and 28.5 ms (flash); the error against an fp64 reference is of the flash kernel's size (output 3.1e-3
relative, gradients 3.5–3.9e-3; flash 1.9e-3 and 3.1–5.1e-3; math 1.6e-3 and 2.4e-3), from rounding the scores
to bf16 before the fp32 softmax. Elsewhere — wider rows, attention dropout, a GPU — transformers' ``sdpa`` with
``is_causal`` and no mask (the flash kernels' fastest case). A model with a sliding window (``sliding_window``
passed by its attention) gets the band mask either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterhub_local.runtime import SHORT_ATTENTION_WIDTH

SLOTS = "adapterhub_segment_slots"
"""Keyword argument: ``[rows, width]`` long tensor, each padded slot's token position in the row."""
TOKENS = "adapterhub_segment_tokens"
"""Keyword argument: ``[tokens]`` long tensor, each token's flat slot in the padded layout."""


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      slots: torch.Tensor, tokens: torch.Tensor, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function result (``[1, tokens, heads, head_dim]``, ``None``) for ``query``,
    ``key``, ``value`` of one padding-free row (``[1, heads, tokens, head_dim]``); the row's own attention mask
    (block-diagonal, if transformers built one) is not needed and not read."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[0] != 1:
        raise ValueError(f"a padding-free batch is one row of sequences; got {query.shape[0]} rows")
    rows, width = slots.shape
    flat = slots.reshape(-1)

    def padded(states: torch.Tensor) -> torch.Tensor:  # [1, h, tokens, d] -> [rows, h, width, d]
        heads, dim = states.shape[1], states.shape[3]
        return states[0].index_select(1, flat).view(heads, rows, width, dim).transpose(0, 1)

    kwargs.pop("is_causal", None)  # always causal: each sequence attends to its own past
    window = kwargs.pop("sliding_window", None)
    allowed = causal_mask(width, window, query.device)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    if (query.device.type == "cpu" and width <= SHORT_ATTENTION_WIDTH and not dropout and heads % kv_heads == 0):
        out = grouped_causal_attention(padded(query), padded(key), padded(value), scaling, allowed)
    else:
        out, _ = sdpa_attention_forward(module, padded(query), padded(key), padded(value), allowed, dropout=dropout,
                                        scaling=scaling, is_causal=allowed is None, **kwargs)  # [rows, width, h, d]
    return out.reshape(rows * width, heads, dim).index_select(0, tokens).unsqueeze(0), None


def causal_mask(width: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """``[width, width]`` boolean mask (True: may attend) of causal attention within a sliding ``window`` (each
    query sees itself and the ``window - 1`` positions before it, as transformers' sliding-window mask), or
    ``None`` where plain causal attention is that already (no window, or one at least ``width`` wide)."""
    if window is None or window >= width:
        return None
    if window < 1:
        raise ValueError(f"sliding_window must be at least 1; got {window}")
    offsets = torch.arange(width, device=device)
    distance = offsets[:, None] - offsets[None, :]  # query position minus key position
    return (distance >= 0) & (distance < window)


def grouped_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scaling: float | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``query`` (``[rows, heads, width, dim]``) over ``key`` and ``value`` (``[rows,
    kv_heads, width, dim]``, ``heads`` a multiple of ``kv_heads``; query head ``h`` reads key/value head
    ``h // (heads / kv_heads)``, as transformers' ``repeat_kv``), as ``[rows, width, heads, dim]`` (transformers'
    attention-function layout). ``allowed`` (``[width, width]`` booleans) replaces the causal mask; it must
    leave every query at least itself. ``scaling`` defaults to ``dim ** -0.5``."""
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if heads != group * kv_heads or key.shape != (rows, kv_heads, width, dim) or value.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} does not match key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} ([rows, heads, width, dim], heads a multiple of the key's)")
    scale = dim**-0.5 if scaling is None else scaling
    if allowed is None:
        allowed = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
    # The query heads that share a key/value head lie next to each other: view them as one longer sequence.
    scores = torch.matmul(query.reshape(rows, kv_heads, group * width, dim), key.transpose(-1, -2))
    scores = (scores.float() * scale).view(rows, kv_heads, group, width, width).masked_fill(~allowed, -torch.inf)
    probabilities = torch.softmax(scores, dim=-1).to(value.dtype).view(rows, kv_heads, group * width, width)
    out = torch.matmul(probabilities, value).view(rows, heads, width, dim)
    return out.transpose(1, 2)
