"""Padding-free training batches (``train.padding_free``): a micro-batch's sequences laid end to end in one row,
so the linear layers, norms and MLPs — nearly all of a step — run on real tokens only.

Why: a right-padded batch runs every layer on ``rows × width`` positions. For batch 8 of lengths 40–100 (the
training benchmark's shape) a quarter of them are padding: 792 rows per linear for 560 real tokens. Length
grouping (``train.group_by_length``) shrinks the padding by changing which examples share a batch — a different
run. Here every batch keeps its examples; only the layout changes.

The row: ``input_ids`` and ``labels`` of each sequence concatenated (the label of each sequence's first token is
dropped: no position predicts it, and the previous sequence's last position must not), ``position_ids``
restarting at 0 for each sequence (rotary embeddings see what they saw padded), and the two index tensors of
:mod:`adapterhub_local.segment_attention`, with which attention gathers the sequences back into a padded layout
and attends each to itself alone. No attention mask is passed: transformers builds its block-diagonal mask from
the restarting positions (not read by the segment attention, but the right mask for any reader).

The loss is the padded batch's: the same labelled positions (:func:`.lm_loss.label_targets` finds them in the
row), the same per-token cross entropy, the same mean. Without dropout the numbers differ from the padded step's
only by rounding (matmuls over a different number of rows may block differently); tests hold losses and gradients
to fp32 rounding on an fp32 model. LoRA dropout draws its masks over the real tokens only: the same distribution as
padded, other draws (a seed still gives one run, and ``--resume`` continues it exactly).

When (``train.padding_free``): ``auto`` (default) and ``true`` use it where it applies — a causal LM trained with
the labelled-positions loss (:mod:`.lm_loss`) in one process, attending with this project's attention functions
(``decode_attention.py``, which hand such a row to the segment attention), on right-padded batches without an
empty row; ``true`` refuses a run where it does not apply, naming why; ``false`` keeps padded batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from adapterhub_local.decode_attention import IMPLEMENTATIONS
from adapterhub_local.segment_attention import SLOTS, TOKENS
from adapterhub_local.train.tasks import IGNORE, Batch, Example


def unsupported_reason(model: torch.nn.Module, fast_loss: bool, processes: int) -> str | None:
    """Why padding-free batches cannot train ``model`` here, or ``None`` if they can."""
    if processes > 1:
        return "it runs in one process only (multi-process runs shard padded batches)"
    if not fast_loss:
        return "it needs the labelled-positions loss (a causal LM, LoRA-style adapter, no logit scaling)"
    config = getattr(model, "config", None)
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None:
        config = getattr(get_base(), "config", config)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in IMPLEMENTATIONS:
        return (f"the model attends with {implementation!r}, not one of this project's attention functions "
                f"({', '.join(IMPLEMENTATIONS)}), which keep each sequence of a row to itself")
    return None


def unpad(batch: Batch) -> Batch | None:
    """The padding-free form of a right-padded causal-LM ``batch`` (``input_ids``, ``attention_mask``, ``labels``,
    ``[rows, width]``), or ``None`` if it is not one (other keys, left padding, holes in a mask, an empty row)."""
    tensors = batch.tensors
    if set(tensors) != {"input_ids", "attention_mask", "labels"}:
        return None
    ids, mask, labels = tensors["input_ids"], tensors["attention_mask"], tensors["labels"]
    if ids.dim() != 2 or mask.shape != ids.shape or labels.shape != ids.shape:
        return None
    lengths = mask.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(ids.shape[1])
    if width == 0 or bool((lengths == 0).any()) or not torch.equal(mask.bool(), positions < lengths[:, None]):
        return None  # only right padding with every row non-empty
    keep = mask.bool()
    row_labels = labels.clone()
    row_labels[:, 0] = IGNORE  # a sequence's first token is nobody's target
    starts = torch.cumsum(lengths, 0) - lengths  # each sequence's first position in the row
    slots = starts[:, None] + positions[None, :width]
    slots = torch.where(positions[None, :width] < lengths[:, None], slots, starts[:, None])  # padding → own start
    rows = torch.arange(ids.shape[0])
    tokens = (rows[:, None] * width + positions[None, :width])[keep[:, :width]]
    return Batch({"input_ids": ids[keep][None], "position_ids": positions[None, :].expand_as(ids)[keep][None],
                  "labels": row_labels[keep][None], SLOTS: slots, TOKENS: tokens}, batch.real_tokens)


def collating(collate: Callable[[Sequence[Example]], Batch]) -> Callable[[Sequence[Example]], Batch]:
    """``collate`` followed by :func:`unpad` (batches it cannot lay out stay padded)."""

    def collate_unpadded(examples: Sequence[Example]) -> Batch:
        batch = collate(examples)
        return unpad(batch) or batch

    return collate_unpadded


def padded_width(tensors: dict[str, Any]) -> int:
    """The attention width of a batch: the padded layout's for a padding-free row, else the batch's own."""
    slots = tensors.get(SLOTS)
    return int(slots.shape[1] if slots is not None else tensors["input_ids"].shape[-1])
