"""A KV cache that grows in place: a decode step writes its new column into spare room instead of copying the cache.

transformers' ``DynamicLayer`` appends by ``torch.cat``, so every decode step copies every layer's whole cache
(O(columns) bytes per step, O(columns²) per generation). On the project CPU that copy was 11–13 % of a 32-row
SmolLM2-shaped base step and a quarter of the step with 32 adapters, whose operands push the cache out of the
shared L3 (torch profiler, ``aten::cat``). :class:`GrowingLayer` keeps each layer's keys and values in a buffer with
room to spare and exposes ``keys``/``values`` as views of its first ``n`` columns; an append writes the new
columns in place, and only running out of room (or a cache edited from outside) copies — with room for half as
many columns again, so copies are amortised O(1) per column.

Everything that reads or replaces ``layer.keys`` / ``layer.values`` (attention, :mod:`kv_rows`' row surgery for
continuous batching, ``crop``, ``batch_select_indices``) keeps working: a replaced tensor is adopted on the next
append (copied into a fresh buffer), and a view that is still a prefix of the buffer is appended to in place
(``crop`` shortens the view; the next append overwrites the dropped columns, as it should). The views returned
are exactly the values ``torch.cat`` would have produced.
"""

from __future__ import annotations

from typing import Any

import torch

ROOM_STEP = 64
"""Buffers are sized in multiples of this many columns."""


def _room_for(columns: int) -> int:
    """Columns to allocate for ``columns`` in use: half as many again (at least :data:`ROOM_STEP`), rounded up."""
    want = columns + max(ROOM_STEP, columns // 2)
    return -(-want // ROOM_STEP) * ROOM_STEP


def _is_prefix(view: torch.Tensor, room: torch.Tensor | None) -> bool:
    """Whether ``view`` is ``room[:, :, :n]`` for some ``n`` (so appending at column ``n`` is in place)."""
    return (room is not None and view.dim() == 4 and view.data_ptr() == room.data_ptr() and view.dtype == room.dtype
            and view.shape[:2] == room.shape[:2] and view.shape[3] == room.shape[3] and view.stride() == room.stride())


def append(current: torch.Tensor, room: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(torch.cat([current, new], dim=-2), buffer)`` with the result a view of ``buffer``: written in place when
    ``current`` is a prefix view of ``room`` with space for ``new``, else copied into a new buffer with room to
    spare. ``current``: ``[B, H, n, D]`` (or an empty tensor: nothing cached yet); ``new``: ``[B, H, a, D]``."""
    used = current.shape[-2] if current.numel() else 0
    total = used + new.shape[-2]
    if not (_is_prefix(current, room) and room is not None and room.shape[0] == new.shape[0]
            and room.shape[-2] >= total):
        room = new.new_empty(new.shape[0], new.shape[1], _room_for(total), new.shape[3])
        if used:
            room[:, :, :used].copy_(current)
    room[:, :, used:total].copy_(new)
    return room[:, :, :total], room


def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """``DynamicLayer`` whose appends write into spare room (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.key_room: torch.Tensor | None = None
            self.value_room: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.keys, self.values
            assert keys is not None and values is not None  # set by lazy_initialization
            keys, self.key_room = append(keys, self.key_room, key_states)
            values, self.value_room = append(values, self.value_room, value_states)
            self.keys, self.values = keys, values
            return keys, values

        def reset(self) -> None:
            self.key_room = self.value_room = None
            super().reset()

    return GrowingLayer


_GROWING: type | None = None


def growing_layer_class() -> type:
    """The :class:`GrowingLayer` class (built on first use: transformers is imported lazily)."""
    global _GROWING
    if _GROWING is None:
        _GROWING = _layer_class()
    return _GROWING


def growing_cache(config: Any) -> Any | None:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place (sliding-window and other layer
    kinds are kept as transformers builds them); ``None`` where transformers cannot build one from the config."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if config is None:
        return None
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    layer = growing_layer_class()
    if cache.layers:
        cache.layers = [layer() if type(existing) is DynamicLayer else existing for existing in cache.layers]
    else:
        cache.layer_class_to_replicate = layer
    return cache
