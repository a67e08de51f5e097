"""vLLM's limits: each feature vLLM refuses or would serve differently is refused with its reason."""

from __future__ import annotations

from typing import Any

import pytest

from adapterhub_local.export.vllm_limits import VLLM_MAX_LORA_RANKS, check_vllm, smallest_max_rank

KEYS = [f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj")
        for ab in "AB"]


def lora(**extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **extra}


def test_a_plain_llama_lora_passes_with_the_smallest_max_rank_and_the_packing_named() -> None:
    check = check_vllm("lora", lora(), KEYS, "LlamaForCausalLM")
    assert check.ok and check.max_lora_rank == 8
    assert any("q_proj+v_proj -> qkv_proj" in n for n in check.notes)


@pytest.mark.parametrize(("rank", "choice"), [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (512, 512), (513, None)])
def test_smallest_max_rank_is_the_first_vllm_choice_at_or_above_the_rank(rank: int, choice: int | None) -> None:
    assert smallest_max_rank(rank) == choice
    assert choice is None or choice in VLLM_MAX_LORA_RANKS


@pytest.mark.parametrize(("kind", "config", "keys", "arch", "reason"), [
    ("lora", lora(r=1024), KEYS, "LlamaForCausalLM", "above vLLM's highest --max-lora-rank (512"),
    ("lora", lora(use_dora=True), KEYS, "LlamaForCausalLM", "DoRA"),
    ("lora", lora(lora_bias=True), KEYS, "LlamaForCausalLM", "biases"),
    ("lora", lora(modules_to_save=["lm_head"]), KEYS, "LlamaForCausalLM", "modules_to_save ['lm_head']"),
    ("lora", lora(fan_in_fan_out=True), KEYS, "LlamaForCausalLM", "transposed"),
    ("lora", lora(rank_pattern={"q_proj": 8}), KEYS, "LlamaForCausalLM", "rank_pattern"),
    ("lora", lora(alpha_pattern={"q_proj": 2}), KEYS, "LlamaForCausalLM", "alpha_pattern"),
    ("lora", lora(init_lora_weights="pissa_niter_4"), KEYS, "LlamaForCausalLM", "rewrites the base weights"),
    ("lora", lora(), KEYS, "GPT2LMHeadModel", "architecture 'GPT2LMHeadModel'"),
    ("lora", lora(), [*KEYS, "base_model.model.score.weight"], "LlamaForCausalLM", "not LoRA A/B pairs"),
    ("lora", lora(), [k.replace("q_proj", "rotary") for k in KEYS], "LlamaForCausalLM", "['rotary']"),
    ("prompt", {}, [], "LlamaForCausalLM", "soft prompt"),
    ("full", {}, [], "LlamaForCausalLM", "whole model"),
])
def test_what_vllm_refuses_or_would_serve_differently_is_refused(
        kind: str, config: dict[str, Any], keys: list[str], arch: str, reason: str) -> None:
    check = check_vllm(kind, config, keys, arch)
    assert not check.ok
    assert any(reason in r for r in check.refusals), check.refusals
    assert all(" — " in r or "—" in r for r in check.refusals)  # every refusal says what to do instead


def test_rslora_is_served_and_said_so() -> None:
    check = check_vllm("lora", lora(use_rslora=True), KEYS, "Qwen2ForCausalLM")
    assert check.ok and any("sqrt(r)" in n for n in check.notes)
