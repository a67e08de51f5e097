"""Building a padded batch: per-row virtual tokens (soft prompts) prepended, then padding, with the
attention mask and position ids that make every row see exactly what it would see alone.

A row is ``[virtual tokens of its soft prompt] + [its prompt tokens]``. Decoders pad on the left (so
every row's next token is at the last position), encoders on the right (so ``[CLS]`` stays first).
Positions count only real tokens (``cumsum(mask) - 1``), so padding never shifts a row's positions, and
a soft-prompt row's prompt starts at position ``num_virtual_tokens`` as in PEFT's prompt tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterhub_local.inference.multi_embedding import embed_rows


@dataclass
class Row:
    """One row before batching."""

    token_ids: list[int]
    prompt: torch.Tensor | None = None  # [num_virtual_tokens, hidden] on the model's device


@dataclass
class Batch:
    """A padded batch ready for the model."""

    input_ids: torch.Tensor  # [B, L] (pad id at padding and virtual positions)
    inputs_embeds: torch.Tensor | None  # [B, L, hidden] when any row has a soft prompt, else None
    attention_mask: torch.Tensor  # [B, L] long, 1 = real (virtual or prompt) token
    position_ids: torch.Tensor  # [B, L]
    prompt_start: list[int]
    """Index of each row's first prompt token (after padding and virtual tokens)."""
    prompt_len: list[int]
    virtual: list[int]

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: ``cumsum(mask) - 1`` (0 at padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def build_batch(rows: list[Row], embeddings: nn.Module, pad_id: int, left: bool = True,
                slots: list[int] | None = None) -> Batch:
    """Pad ``rows`` into one batch, prepending each row's virtual tokens to its prompt. ``slots`` (each row's
    global adapter slot) lets a per-row embedding adapter (:mod:`multi_embedding`) adapt the rows' token
    embeddings when they are computed here, outside the model's forward (soft-prompt batches)."""
    weight = embeddings.weight
    assert isinstance(weight, torch.Tensor)
    device = weight.device
    virtual = [0 if r.prompt is None else int(r.prompt.shape[0]) for r in rows]
    lengths = [v + len(r.token_ids) for v, r in zip(virtual, rows, strict=True)]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    starts: list[int] = []
    for i, (row, v, n) in enumerate(zip(rows, virtual, lengths, strict=True)):
        begin = width - n if left else 0
        ids[i, begin + v: begin + n] = torch.tensor(row.token_ids, dtype=torch.long)
        mask[i, begin: begin + n] = 1
        starts.append(begin + v)
    ids, mask = ids.to(device), mask.to(device)
    embeds = None
    if any(virtual):
        embeds = embed_rows(embeddings, ids, slots)
        for i, (row, v) in enumerate(zip(rows, virtual, strict=True)):
            if row.prompt is not None:
                begin = starts[i] - v
                embeds[i, begin: begin + v] = row.prompt.to(embeds.dtype)
    return Batch(ids, embeds, mask, positions(mask), starts, [len(r.token_ids) for r in rows], virtual)
