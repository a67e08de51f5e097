"""The attention of padding-free rows: the grouped causal kernel against torch's own attention (values and
gradients, grouped-query shapes, sliding windows, bf16 error against an fp64 reference), which kernel answers
where, and a sliding-window model trained padding-free against its padded batch."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import MistralConfig, MistralForCausalLM

from adapterhub_local import segment_attention
from adapterhub_local.decode_attention import use_decode_attention
from adapterhub_local.runtime import SHORT_ATTENTION_WIDTH
from adapterhub_local.segment_attention import causal_mask, grouped_causal_attention
from adapterhub_local.train import lm_loss, padding_free
from adapterhub_local.train.tasks import Example, collate_generation


def _qkv(rows: int, heads: int, kv_heads: int, width: int, dim: int, dtype: torch.dtype = torch.float32,
         seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(rows, heads, width, dim), (rows, kv_heads, width, dim), (rows, kv_heads, width, dim)]
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               allowed: torch.Tensor | None) -> torch.Tensor:
    """torch's math kernel, keys and values repeated per query head as transformers' ``repeat_kv`` does;
    ``[rows, width, heads, dim]``."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, is_causal=allowed is None,
                                             scale=scaling)
    return out.transpose(1, 2)


def _with_grads(fn: Any, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return [out.detach(), *(t.grad for t in inputs if t.grad is not None)]


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (9, 3), (6, 1)])
@pytest.mark.parametrize("scaling", [None, 0.3])
@pytest.mark.parametrize("window", [None, 1, 3, 50])
def test_the_grouped_kernel_equals_torchs_attention_with_its_gradients(heads: int, kv_heads: int,
                                                                       scaling: float | None,
                                                                       window: int | None) -> None:
    tensors = _qkv(3, heads, kv_heads, 11, 8, seed=heads * 10 + kv_heads)
    allowed = causal_mask(11, window, torch.device("cpu"))
    ours = _with_grads(lambda q, k, v: grouped_causal_attention(q, k, v, scaling, allowed), tensors)
    theirs = _with_grads(lambda q, k, v: _reference(q, k, v, scaling, allowed), tensors)
    assert ours[0].shape == (3, 11, heads, 8) and len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_sliding_window_mask_is_transformers_band() -> None:
    allowed = causal_mask(6, 3, torch.device("cpu"))
    assert allowed is not None
    for q in range(6):
        assert [k for k in range(6) if allowed[q, k]] == [k for k in range(q + 1) if q - k < 3]
    assert causal_mask(6, None, torch.device("cpu")) is None and causal_mask(6, 6, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="at least 1"):
        causal_mask(6, 0, torch.device("cpu"))


def test_mismatched_shapes_are_refused_with_the_layout_named() -> None:
    query, key, value = _qkv(2, 6, 4, 5, 8)  # 6 query heads cannot share 4 key/value heads
    with pytest.raises(ValueError, match="heads a multiple"):
        grouped_causal_attention(query, key, value)
    query, key, value = _qkv(2, 4, 2, 5, 8)
    with pytest.raises(ValueError, match="does not match"):
        grouped_causal_attention(query, key[:, :, :4], value)


def test_bf16_error_against_fp64_is_of_torchs_own_kernels_size() -> None:
    """The scores are rounded to bf16 before the fp32 softmax: the error stays of the size torch's own bf16
    kernels make (SmolLM2's attention shape), not a wrong answer."""
    tensors = _qkv(4, 9, 3, 100, 64, dtype=torch.bfloat16, seed=3)
    exact = _with_grads(lambda q, k, v: _reference(q, k, v, None, None),
                        [t.detach().double() for t in tensors])

    def errors(fn: Any) -> list[float]:
        got = _with_grads(fn, tensors)
        return [float((g.double() - e).norm() / e.norm()) for g, e in zip(got, exact, strict=True)]

    ours = errors(lambda q, k, v: grouped_causal_attention(q, k, v))
    flash = errors(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  enable_gqa=True).transpose(1, 2))
    assert all(e < 1e-2 for e in ours), ours
    assert all(o < 2.5 * max(f, 1e-3) for o, f in zip(ours, flash, strict=True)), (ours, flash)


class _Spy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return grouped_causal_attention(*args, **kwargs)


def _row(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8) -> dict[str, Any]:
    """One padding-free row of sequences of ``lengths``: its queries, keys, values and index tensors."""
    rng = random.Random(0)
    batch = collate_generation([Example([rng.randrange(3, 50) for _ in range(n)], [1] * n) for n in lengths], 0)
    row = padding_free.unpad(batch)
    assert row is not None
    generator = torch.Generator().manual_seed(2)
    tokens = sum(lengths)
    query, key, value = (torch.randn(1, h, tokens, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    return {"query": query, "key": key, "value": value, "slots": row.tensors[segment_attention.SLOTS],
            "tokens": row.tensors[segment_attention.TOKENS]}


@pytest.mark.parametrize(("lengths", "dropout", "grouped"), [
    ([5, 9, 3], 0.0, True),
    ([SHORT_ATTENTION_WIDTH, 3], 0.0, True),
    ([SHORT_ATTENTION_WIDTH + 1, 3], 0.0, False),  # wider: transformers' sdpa (the flash kernel)
    ([5, 9, 3], 0.1, False),  # attention dropout: sdpa, which draws it
])
def test_the_grouped_kernel_answers_short_rows_on_cpu_and_sdpa_the_rest(monkeypatch: pytest.MonkeyPatch,
                                                                         lengths: list[int], dropout: float,
                                                                         grouped: bool) -> None:
    spy = _Spy()
    monkeypatch.setattr(segment_attention, "grouped_causal_attention", spy)
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # type: ignore[assignment]  # what transformers' sdpa reads
    module.training = False
    parts = _row(lengths)
    out, _ = segment_attention.segment_attention(module, dropout=dropout, scaling=None, **parts)
    assert spy.calls == int(grouped)
    assert out.shape == (1, sum(lengths), 4, 8)
    if dropout == 0.0:  # either kernel: each sequence attends to itself only, as alone
        start = 0
        for n in lengths:
            q, k, v = (parts[name][:, :, start:start + n] for name in ("query", "key", "value"))
            alone = _reference(q, k, v, None, None)[0]
            assert torch.allclose(out[0, start:start + n], alone, rtol=1e-5, atol=1e-6)
            start += n


def _mistral(window: int) -> Any:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=window)
    model = MistralForCausalLM(config)
    assert use_decode_attention(model)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.mark.parametrize("window", [3, 8])
def test_a_sliding_window_model_trains_padding_free_as_padded(window: int) -> None:
    """Mistral attends within a window; its padded batch gets transformers' window mask, its padding-free row
    the same band — same loss and gradients (fp32)."""
    model = _mistral(window)
    rng = random.Random(window)
    examples = []
    for n in (5, 17, 2, 11):
        ids = [rng.randrange(3, 96) for _ in range(n)]
        examples.append(Example(ids, list(ids)))
    padded = collate_generation(examples, pad_id=0)
    row = padding_free.unpad(padded)
    assert row is not None
    results = []
    for batch in (padded, row):
        model.zero_grad()
        loss = lm_loss.causal_lm_loss(model, dict(batch.tensors), lm_loss.label_targets(batch.tensors["labels"]))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_p, grads_p), (loss_r, grads_r) = results
    assert torch.allclose(loss_p, loss_r, rtol=1e-6, atol=1e-6)
    assert grads_p.keys() == grads_r.keys() and len(grads_p) == 8
    for name, grad in grads_p.items():
        assert torch.allclose(grad, grads_r[name], rtol=1e-5, atol=1e-6), name
