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
``sdpa`` attention with ``is_causal`` and no mask (the flash/math kernels' fastest case), and gathers the outputs
back. A single row of every sequence with transformers' block-diagonal mask would give the same result at
``tokens²`` instead of ``rows × width²`` attention work (about 4× more at batch 8 of lengths 40–100). The
gathers are a few copies of the attention inputs; their backward is a scatter-add.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
    out, _ = sdpa_attention_forward(module, padded(query), padded(key), padded(value), None, dropout=dropout,
                                    scaling=scaling, is_causal=True, **kwargs)  # [rows, width, heads, d]
    heads, dim = out.shape[2], out.shape[3]
    return out.reshape(rows * width, heads, dim).index_select(0, tokens).unsqueeze(0), None
