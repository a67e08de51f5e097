"""The in-place growing KV cache: every append equals ``torch.cat``, in place while there is room, and edits made
from outside (row surgery, crop) are honoured."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterhub_local.inference import kv_rows
from adapterhub_local.inference.generation import forward_cached
from adapterhub_local.inference.growing_cache import append, growing_cache, growing_layer_class
from tests.inference.conftest import make_llama


def kv(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 2, columns, 8, generator=torch.Generator().manual_seed(seed))


def test_appends_equal_cat_and_write_in_place_while_there_is_room() -> None:
    current, room = torch.tensor([]), None
    expected = torch.empty(3, 2, 0, 8)
    moves = 0
    for step, width in enumerate([5, 1, 1, 7, 1, 60, 1, 60, 1]):
        new = kv(3, width, step)
        before = None if room is None else room.data_ptr()
        current, room = append(current, room, new)
        expected = torch.cat([expected, new], dim=-2)
        assert torch.equal(current, expected)
        assert current.data_ptr() == room.data_ptr() and room.shape[-2] >= current.shape[-2]
        moves += before != room.data_ptr()
    assert moves == 2  # the first append (room for 128) and running out of it (136): the rest in place


def test_a_replaced_or_cropped_cache_is_honoured() -> None:
    current, room = append(torch.tensor([]), None, kv(4, 6, 0))
    # row surgery from outside (continuous batching): a new tensor is adopted, copied into a fresh buffer
    kept = current.index_select(0, torch.tensor([3, 1]))
    grown, room2 = append(kept, room, kv(2, 1, 1))
    assert room2.data_ptr() != room.data_ptr() and torch.equal(grown, torch.cat([kept, kv(2, 1, 1)], dim=-2))
    # crop: a shorter prefix view; the next append overwrites the dropped columns
    cropped = grown[:, :, :4]
    again, room3 = append(cropped, room2, kv(2, 2, 2))
    assert room3.data_ptr() == room2.data_ptr()  # in place
    assert torch.equal(again, torch.cat([kept[:, :, :4], kv(2, 2, 2)], dim=-2))
    # a view that is not a prefix of the buffer (columns dropped on the left) is copied, never written through
    shifted = again[:, :, 1:]
    moved, room4 = append(shifted, room3, kv(2, 1, 3))
    assert room4.data_ptr() != room3.data_ptr() and torch.equal(moved, torch.cat([shifted, kv(2, 1, 3)], dim=-2))


def test_a_model_decodes_the_same_with_it_and_row_surgery_works(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "llama")).eval()
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grown = forward_cached(model, input_ids=ids)
        plain = model(input_ids=ids, use_cache=True, past_key_values=DynamicCache(config=model.config))
        cache, reference = grown.past_key_values, plain.past_key_values
        assert all(type(layer) is growing_layer_class() for layer in cache.layers)
        for step in range(5):
            token = torch.full((3, 1), 10 + step)
            if step == 2:  # a row leaves (continuous batching's surgery), in both caches
                keep = torch.tensor([0, 2])
                kv_rows.select_rows(cache, keep)
                kv_rows.select_rows(reference, keep)
            rows = kv_rows.width(cache)
            assert rows == kv_rows.width(reference)
            token = token[: cache.layers[0].keys.shape[0]]
            a = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            b = model(input_ids=token, past_key_values=reference, use_cache=True).logits
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for mine, theirs in zip(cache.layers, reference.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_configs_it_cannot_build_leave_the_models_own_cache() -> None:
    assert growing_cache(None) is None
