"""Row surgery on a Hugging Face KV cache: select rows, pad on the left, trim leading padding, stack batches.

The open decode batch (:mod:`adapterhub_local.inference.continuous`) keeps one *right-aligned* padded cache:
every row's real tokens (virtual + prompt + generated) end at the last column, so row ``i`` occupies the
last ``n_i`` columns and the columns before are padding that the attention mask hides. Rows therefore
join by left-padding (the new rows' prefill cache or the running one, whichever is shorter) and stacking
along the batch dimension — or, in a mixed prefill/decode step, as empty rows, after which one gather per
layer moves every row's real tokens back into a right-aligned run — and leave by selecting the rows that
stay and cutting the columns no row needs any more. Padding keys/values are zeros; the mask gives them
zero attention weight, so a row's attention reads exactly its own tokens, as when it runs alone (the same
invariant as the left-padded batches of :mod:`soft_prompt`).

Works on caches made of layers holding ``keys``/``values`` tensors ``[B, heads, T, head_dim]``
(transformers' ``DynamicCache``, what the decoders we serve build by default).
"""

from __future__ import annotations

from typing import Any

import torch

from adapterhub_local.errors import UnsupportedError


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or not hasattr(layer, "values") for layer in layers):
        raise UnsupportedError(f"continuous batching cannot edit a {type(cache).__name__} KV cache",
                               "serve this base with dynamic batching (--no-continuous)")
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise UnsupportedError("continuous batching does not support sliding-window caches",
                               "serve this base with dynamic batching (--no-continuous)")
    return list(layers)


def width(cache: Any) -> int:
    """Columns (cached positions) of the cache."""
    return int(_layers(cache)[0].keys.shape[-2])


def select_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep only the rows ``index`` (a long tensor on the cache's device), in that order (in place)."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)


def drop_left(cache: Any, columns: int) -> None:
    """Remove the first ``columns`` columns (padding no row needs any more), in place."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, columns:].contiguous()
        layer.values = layer.values[:, :, columns:].contiguous()


def pad_left(cache: Any, columns: int) -> None:
    """Prepend ``columns`` zero columns to every row, in place."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            zeros = tensor.new_zeros((*tensor.shape[:2], columns, tensor.shape[-1]))
            setattr(layer, name, torch.cat([zeros, tensor], dim=-2))


def stack(cache: Any, other: Any) -> None:
    """Append ``other``'s rows below ``cache``'s (both right-aligned; the narrower one is left-padded first)."""
    mine, theirs = width(cache), width(other)
    pad_left(cache, theirs - mine)
    pad_left(other, mine - theirs)
    for layer, extra in zip(_layers(cache), _layers(other), strict=True):
        layer.keys = torch.cat([layer.keys, extra.keys], dim=0)
        layer.values = torch.cat([layer.values, extra.values], dim=0)


def right_aligned_mask(lengths: list[int], columns: int, device: torch.device) -> torch.Tensor:
    """``[B, columns]`` long mask with the last ``lengths[i]`` columns of row ``i`` set."""
    mask = torch.zeros((len(lengths), columns), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, columns - n:] = 1
    return mask.to(device)


def add_empty_rows(cache: Any, rows: int) -> None:
    """Append ``rows`` all-zero rows (fully masked: rows about to be prefilled), in place."""
    if rows <= 0:
        return
    for layer in _layers(cache):
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            setattr(layer, name, torch.cat([tensor, tensor.new_zeros((rows, *tensor.shape[1:]))], dim=0))


def gather_columns(cache: Any, index: torch.Tensor) -> None:
    """Row ``i`` keeps columns ``index[i]`` (``[B, T']`` long on the cache's device), in place: how a mixed
    prefill/decode step puts every row's real tokens back into one right-aligned run."""
    for layer in _layers(cache):
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            expanded = index[:, None, :, None].expand(tensor.shape[0], tensor.shape[1], index.shape[1], tensor.shape[3])
            setattr(layer, name, tensor.gather(2, expanded))
