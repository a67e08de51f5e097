"""Padding-free training batches: the layout, the loss and gradients against the padded batch's, each sequence's
hidden states against the sequence run alone, the segment attention actually answering, and when the loop
uses them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapterhub_local import segment_attention
from adapterhub_local.config import AutoSwitch, TrainConfig
from adapterhub_local.decode_attention import use_decode_attention
from adapterhub_local.errors import ConfigError
from adapterhub_local.segment_attention import SLOTS, TOKENS
from adapterhub_local.train import lm_loss, padding_free
from adapterhub_local.train.loop import train_loop
from adapterhub_local.train.tasks import IGNORE, Batch, Example, collate_generation


def _llama(ours: bool = True, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    llama: torch.nn.Module = LlamaForCausalLM(config)
    model = cast(LlamaForCausalLM, llama.to(dtype))
    if ours:
        assert use_decode_attention(model)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _examples(lengths: list[int], seed: int = 0, prompt: int = 2) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 96) for _ in range(n)]
        out.append(Example(ids, [IGNORE] * min(prompt, n) + ids[prompt:]))
    return out


def _loss_and_grads(model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    inputs = dict(batch.tensors)
    loss = lm_loss.causal_lm_loss(model, inputs, lm_loss.label_targets(inputs["labels"]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lengths", [[5, 9, 3, 7], [1, 12, 2], [6], [4, 4, 4], [2, 30, 1, 17, 8]])
def test_the_row_holds_each_sequence_once_with_its_own_positions_and_a_round_trip_layout(lengths: list[int]) -> None:
    padded = collate_generation(_examples(lengths, prompt=0), pad_id=0)  # every token labelled, the first too
    row = padding_free.unpad(padded)
    assert row is not None and row.real_tokens == padded.real_tokens == sum(lengths)
    t = row.tensors
    assert t["input_ids"].shape == (1, sum(lengths))
    assert t["input_ids"][0].tolist() == [tok for e in _examples(lengths) for tok in e.input_ids]
    assert t["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(t["labels"][0, s] == IGNORE for s in starts)  # nobody predicts a sequence's first token
    assert t[SLOTS].shape == (len(lengths), max(lengths))
    # every token's slot points back at the token; every slot points into its own sequence
    assert torch.equal(t[SLOTS].reshape(-1)[t[TOKENS]], torch.arange(sum(lengths)))
    for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        assert ((t[SLOTS][r] >= s) & (t[SLOTS][r] < s + n)).all()


def test_the_labelled_positions_are_the_padded_batchs() -> None:
    padded = collate_generation(_examples([5, 9, 3, 7], prompt=3), pad_id=0)
    row = padding_free.unpad(padded)
    assert row is not None
    a, b = lm_loss.label_targets(padded.tensors["labels"]), lm_loss.label_targets(row.tensors["labels"])
    assert torch.equal(a.tokens, b.tokens) and a.count == b.count > 0


def test_batches_it_cannot_lay_out_stay_padded() -> None:
    padded = collate_generation(_examples([5, 9, 3]), pad_id=0)
    t = padded.tensors
    left = {k: torch.flip(v, dims=[1]) for k, v in t.items()}  # left padding
    holes = {**t, "attention_mask": t["attention_mask"].clone()}
    holes["attention_mask"][1, 2] = 0
    empty = {k: v.clone() for k, v in t.items()}
    empty["attention_mask"][2] = 0
    extra = {**t, "token_type_ids": torch.zeros_like(t["input_ids"])}
    for tensors in (left, holes, empty, extra, {k: v[0] for k, v in t.items()}):
        assert padding_free.unpad(Batch(tensors, 1)) is None
    assert padding_free.collating(lambda ex: Batch(left, 1))([]).tensors is left


@pytest.mark.parametrize("prompt", [0, 2])
@pytest.mark.parametrize("lengths", [[5, 9, 3, 7], [1, 12, 2], [6], [2, 30, 1, 17, 8]])
def test_loss_and_gradients_equal_the_padded_batchs_in_fp32(lengths: list[int], prompt: int) -> None:
    model = _llama()
    padded = collate_generation(_examples(lengths, seed=len(lengths), prompt=prompt), pad_id=0)
    row = padding_free.unpad(padded)
    assert row is not None
    loss_p, grads_p = _loss_and_grads(model, padded)
    loss_r, grads_r = _loss_and_grads(model, row)
    assert torch.allclose(loss_p, loss_r, rtol=1e-6, atol=1e-6)
    assert grads_p.keys() == grads_r.keys() and len(grads_p) == 8  # LoRA A, B of q, v in 2 layers
    for name, grad in grads_p.items():
        assert torch.allclose(grad, grads_r[name], rtol=1e-5, atol=1e-6), name


def test_bf16_loss_stays_within_bf16_rounding_of_the_padded_batchs() -> None:
    model = _llama(dtype=torch.bfloat16)
    padded = collate_generation(_examples([5, 9, 3, 7]), pad_id=0)
    row = padding_free.unpad(padded)
    assert row is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_p, _ = _loss_and_grads(model, padded)
        loss_r, _ = _loss_and_grads(model, row)
    assert abs(float(loss_p) - float(loss_r)) < 0.02 * float(loss_p)


def test_each_sequences_hidden_states_are_its_own_run_alone() -> None:
    model = _llama()
    backbone = model.get_base_model().model
    examples = _examples([5, 9, 3, 7])
    row = padding_free.unpad(collate_generation(examples, pad_id=0))
    assert row is not None
    inputs = {k: v for k, v in row.tensors.items() if k != "labels"}
    with torch.no_grad():
        together = backbone(**inputs, use_cache=False).last_hidden_state[0]
        start = 0
        for e in examples:
            alone = backbone(input_ids=torch.tensor([e.input_ids]), use_cache=False).last_hidden_state[0]
            assert torch.allclose(together[start:start + len(e.input_ids)], alone, atol=1e-5)
            start += len(e.input_ids)


def test_the_segment_attention_answers_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = segment_attention.segment_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(args[4].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr("adapterhub_local.decode_attention.segment_attention", spy)
    model = _llama()
    row = padding_free.unpad(collate_generation(_examples([5, 9, 3]), pad_id=0))
    assert row is not None
    _loss_and_grads(model, row)
    assert calls == [(3, 9), (3, 9)]  # both layers, the padded layout's rows × width


def test_when_padding_free_batches_apply() -> None:
    ours, plain = _llama(), _llama(ours=False)
    assert padding_free.unsupported_reason(ours, fast_loss=True, processes=1) is None
    reason = padding_free.unsupported_reason(plain, fast_loss=True, processes=1)
    assert reason is not None and "'sdpa'" in reason
    assert "one process" in (padding_free.unsupported_reason(ours, fast_loss=True, processes=2) or "")
    assert "labelled-positions loss" in (padding_free.unsupported_reason(ours, fast_loss=False, processes=1) or "")


def _train(tmp_path: Path, model: Any, setting: str, steps: int = 3) -> list[str]:
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=steps, warmup_ratio=0.0, eval_every=10**6, log_every=1,
                      precision="fp32", compile=AutoSwitch("false"), padding_free=AutoSwitch(setting))
    examples = _examples([5, 9, 3, 7, 12, 2, 6, 6, 1, 11, 4, 8], seed=3)
    (tmp_path / setting).mkdir(exist_ok=True)
    train_loop(model, examples, lambda ex: collate_generation(ex, 0), cfg, tmp_path / setting,
               lambda m: {}, "none", True, progress=False)
    return (tmp_path / setting / "metrics.jsonl").read_text().splitlines()


def test_a_run_trains_padding_free_by_default_and_ends_where_the_padded_run_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = segment_attention.segment_attention

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr("adapterhub_local.decode_attention.segment_attention", counted)
    unpadded, padded = _llama(), _llama()
    _train(tmp_path, unpadded, "auto")
    assert len(calls) == 3 * 2  # 3 steps × 2 layers
    _train(tmp_path, padded, "false")
    assert len(calls) == 6  # the padded run never reached it
    trained = {n: p for n, p in unpadded.named_parameters() if p.requires_grad}
    for name, param in padded.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, trained[name], rtol=1e-4, atol=1e-6), name


def test_true_refuses_a_run_it_cannot_train_and_auto_falls_back(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.padding_free is true.*'sdpa'.*set train.padding_free to auto"):
        _train(tmp_path, _llama(ours=False), "true", steps=1)
    assert _train(tmp_path, _llama(ours=False), "auto", steps=1)  # padded batches, no complaint
