"""GPT-2's ``Conv1D`` layers (weights stored transposed, PEFT's ``fan_in_fan_out``): swap and merge match PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.inference import Engine, Request
from adapterhub_local.registry import CardInfo, Registry
from tests.inference.conftest import char_tokenizer, lora_dir


@pytest.fixture(scope="module")
def gpt2_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    char_tokenizer(chat=False).save_pretrained(root / "gpt2")
    registry = Registry(root / "registry")
    registry.add_base("g", str(root / "gpt2"))
    for name, rank, targets in [("attn", 4, ["c_attn"]), ("mlp", 8, ["c_fc", "c_proj"])]:
        registry.register_adapter(name, lora_dir(root / "gpt2", root / name, rank, targets, seed=rank,
                                                 fan_in_fan_out=True), "g", CardInfo(task_type="causal_lm"))
    return registry


def peft_logits(registry: Registry, ref: str, ids: list[int], merged: bool) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = registry.verified_path(ref, "g")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registry.base("g").path), path)
    model = model.merge_and_unload() if merged else model
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("ref", ["attn", "mlp"])
def test_conv1d_swap_and_merge_match_peft(gpt2_registry: Registry, ref: str, tmp_path: Path) -> None:
    swap = Engine(gpt2_registry, "g")
    ids = swap.runner.encode(Request(prompt="conv one d"))
    other = "mlp" if ref == "attn" else "attn"
    got = swap.logits([Request(prompt="x y", adapter=other), Request(prompt=ids, adapter=ref)])[1].logits
    torch.testing.assert_close(got, peft_logits(gpt2_registry, ref, ids, merged=False), atol=1e-5, rtol=0)
    merged = Engine(gpt2_registry, "g", mode="merge").logits([Request(prompt=ids, adapter=ref)])[0].logits
    torch.testing.assert_close(merged, peft_logits(gpt2_registry, ref, ids, merged=True), atol=1e-5, rtol=0)


def test_gpt2_static_decoding_equals_dynamic(gpt2_registry: Registry) -> None:
    from adapterhub_local.inference import SamplingParams

    def batch() -> list[Request]:
        sampling = SamplingParams(max_new_tokens=6, stop_at_eos=False)
        return [Request(prompt="conv one", adapter="attn", sampling=sampling),
                Request(prompt="two", adapter="mlp", sampling=sampling), Request(prompt="none", sampling=sampling)]

    dynamic = Engine(gpt2_registry, "g", decoder="dynamic").generate(batch())
    static = Engine(gpt2_registry, "g", decoder="static").generate(batch())
    assert [r.token_ids for r in static] == [r.token_ids for r in dynamic]
