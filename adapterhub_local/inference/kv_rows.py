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


# ------------------------------------------------------------------ static slabs (:mod:`slab_rows`)
def static_layers(cache: Any) -> list[Any]:
    """The layers of a transformers ``StaticCache`` whose rows and write position :mod:`slab_rows` manages
    (``keys``/``values`` ``[B, heads, L, head_dim]`` and a device counter ``cumulative_length``)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "cumulative_length") for layer in layers):
        raise UnsupportedError(f"a {type(cache).__name__} has no per-layer write position to set",
                               "upgrade transformers (5.x) or use decoder='dynamic'")
    return list(layers)


def set_write_position(cache: Any, column: int) -> None:
    """Make the next step write column ``column`` of every row (the cache's own counter, on the device)."""
    for layer in static_layers(cache):
        layer.cumulative_length.fill_(column)


def write_rows(cache: Any, source: Any, rows: torch.Tensor, columns: torch.Tensor, source_rows: torch.Tensor,
               source_columns: torch.Tensor) -> None:
    """``cache[rows[i], :, columns[i]] = source[source_rows[i], :, source_columns[i]]`` for every layer: a
    joiner's prefill (``source``: a dynamic cache) written into its slab row, nothing else copied."""
    for layer, other in zip(static_layers(cache), _layers(source), strict=True):
        layer.keys[rows, :, columns] = other.keys[source_rows, :, source_columns].to(layer.keys.dtype)
        layer.values[rows, :, columns] = other.values[source_rows, :, source_columns].to(layer.values.dtype)


def save_columns(cache: Any, columns: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of ``columns`` of every row and layer (restored by :func:`restore_columns`)."""
    return [(layer.keys[:, :, columns].clone(), layer.values[:, :, columns].clone()) for layer in static_layers(cache)]


def restore_columns(cache: Any, columns: torch.Tensor, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (keys, values) in zip(static_layers(cache), saved, strict=True):
        layer.keys[:, :, columns] = keys
        layer.values[:, :, columns] = values


def copy_into(cache: Any, larger: Any) -> None:
    """Copy every row and column of ``cache`` into the leading rows and columns of ``larger`` (a slab grows)."""
    for layer, big in zip(static_layers(cache), static_layers(larger), strict=True):
        rows, columns = layer.keys.shape[0], layer.keys.shape[2]
        big.keys[:rows, :, :columns] = layer.keys
        big.values[:rows, :, :columns] = layer.values


def layer_shapes(cache: Any) -> tuple[list[int], list[int], torch.dtype]:
    """KV heads and head size per layer, and the dtype, of a dynamic cache (to allocate a slab like it)."""
    layers = _layers(cache)
    return ([int(layer.keys.shape[1]) for layer in layers], [int(layer.keys.shape[3]) for layer in layers],
            layers[0].keys.dtype)
