"""The fast causal-LM loss (LM head on labelled positions only) equals the model's own loss and gradients."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adapterhub_local import runtime
from adapterhub_local.train import lm_loss
from adapterhub_local.train.tasks import IGNORE, Example, collate_generation


def _llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model: torch.nn.Module = LlamaForCausalLM(config)
    return model.to(dtype)


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def _lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    runtime.upcast_trainable(peft_model)
    with torch.no_grad():  # a non-zero B, so the adapter changes the output and gets gradients everywhere
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return peft_model


def _batch() -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths with prompt tokens (-100) before the completion."""
    generator = torch.Generator().manual_seed(3)
    examples = []
    for length, prompt in [(9, 3), (5, 2), (12, 0), (7, 6)]:
        ids = torch.randint(3, 97, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return collate_generation(examples, 0).tensors


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fast_loss_equals_the_models_own_loss_and_gradients_in_fp32(kind: str) -> None:
    model = _lora(_llama(), ["q_proj", "v_proj"]) if kind == "llama" else _lora(_gpt2(), ["c_attn"])
    batch = _batch()
    assert lm_loss.supports(model, batch)
    own = model(**batch).loss
    own.backward()
    own_grads = _grads(model)
    fast = lm_loss.causal_lm_loss(model, batch, lm_loss.label_targets(batch["labels"]))
    fast.backward()
    fast_grads = _grads(model)
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-6)
    assert own_grads.keys() == fast_grads.keys() and own_grads
    for name, grad in own_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_fast_loss_under_bf16_matches_the_fp32_figure_within_bf16_rounding() -> None:
    model = _lora(_llama(torch.bfloat16), ["q_proj", "v_proj"])
    batch = _batch()
    with runtime.autocast("bf16", "cpu"):
        own = model(**batch).loss
        fast = lm_loss.causal_lm_loss(model, batch, lm_loss.label_targets(batch["labels"]))
    assert fast.dtype == torch.float32
    assert abs(float(fast) - float(own)) < 0.01 * float(own)


def test_label_targets_are_the_shifted_labelled_positions() -> None:
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, 8, 9, 10]])
    targets = lm_loss.label_targets(labels)
    # position t of row r (flat r * 4 + t) predicts labels[r, t + 1]
    assert targets.positions.tolist() == [1, 2, 4, 5, 6, 7]
    assert targets.tokens.tolist() == [5, 6, 7, 8, 9, 10]
    assert targets.rows.tolist() == [0, 0, 1, 1, 1, 1]
    assert targets.count == 6


def test_models_whose_forward_is_more_than_backbone_and_head_keep_their_own_loss() -> None:
    batch = _batch()
    prompt = get_peft_model(_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not lm_loss.supports(prompt, batch)
    capped = _llama()
    cast(LlamaConfig, capped.config).final_logit_softcapping = 30.0
    assert not lm_loss.supports(capped, batch)
    assert not lm_loss.supports(_llama(), {"labels": torch.zeros(4, dtype=torch.long)})  # a class label each
    with pytest.raises(ValueError, match="own forward"):
        lm_loss.causal_lm_loss(prompt, batch, lm_loss.label_targets(batch["labels"]))


def test_skipping_peft_input_casts_under_autocast_changes_nothing() -> None:
    """The loop turns off PEFT's cast of LoRA inputs to fp32 under bf16 autocast (the matmul casts back)."""
    from peft.helpers import disable_input_dtype_casting

    model = _lora(_llama(torch.bfloat16), ["q_proj", "v_proj"])
    batch = _batch()
    results = []
    for skip in (False, True):
        with runtime.autocast("bf16", "cpu"), disable_input_dtype_casting(model, active=skip):
            loss = lm_loss.causal_lm_loss(model, batch, lm_loss.label_targets(batch["labels"]))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_cast, grads_cast), (loss_skip, grads_skip) = results
    assert torch.equal(loss_cast, loss_skip)
    assert grads_cast.keys() == grads_skip.keys()
    for name, grad in grads_cast.items():
        assert torch.equal(grad, grads_skip[name]), name
