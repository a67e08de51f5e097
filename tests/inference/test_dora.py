"""DoRA served exactly: swap and merge equal PEFT (Llama ``Linear`` and GPT-2 ``Conv1D`` with biases), a mixed
batch of DoRA, LoRA, soft-prompt and base rows gives each row its solo answer, unmerge restores the base bit for
bit, a DoRA adapter installed while another is merged still uses the clean weights, the static decoder agrees,
and the stored version loads in PEFT unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch

from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import CardInfo, Registry
from tests.inference.conftest import char_tokenizer, lora_dir, make_llama, prompt_dir


def dora_dir(base_dir: Path, out: Path, rank: int, targets: list[str], seed: int, **extra: Any) -> Path:
    """A PEFT DoRA adapter with random A, B and magnitudes (not the initial column norms, so the factor is not 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                                      use_dora=True, task_type="CAUSAL_LM", **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3 / rank ** 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def dora_zoo(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("dora")
    registry = Registry(root / "registry")
    llama = make_llama(root / "llama")
    registry.add_base("tiny", str(llama))
    info = CardInfo(task="test", task_type="causal_lm")
    registry.register_adapter("dora", dora_dir(llama, root / "dora", 4, ["q_proj", "v_proj", "down_proj"], 1),
                              "tiny", info)
    registry.register_adapter("dora-r8", dora_dir(llama, root / "dora-r8", 8, ["q_proj", "o_proj"], 2), "tiny", info)
    registry.register_adapter("lora", lora_dir(llama, root / "lora", 4, ["q_proj", "v_proj"], 3), "tiny", info)
    registry.register_adapter("soft", prompt_dir(llama, root / "soft", 4, 4), "tiny", info)
    return registry


def peft_logits(registry: Registry, base: str, ref: str, ids: list[int], merged: bool = False) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = registry.verified_path(ref, base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registry.base(base).path), path)
    model = model.merge_and_unload() if merged else model
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("strategy", ["gather", "dense"])
@pytest.mark.parametrize("ref", ["dora", "dora-r8"])
def test_swap_logits_match_peft(dora_zoo: Registry, ref: str, strategy: str) -> None:
    engine = Engine(dora_zoo, "tiny", lora_strategy=strategy)
    ids = engine.runner.encode(Request(prompt="dora rows"))
    got = engine.logits([Request(prompt="other", adapter="lora"), Request(prompt=ids, adapter=ref)])[1].logits
    torch.testing.assert_close(got, peft_logits(dora_zoo, "tiny", ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ref", ["dora", "dora-r8"])
def test_merge_logits_match_peft(dora_zoo: Registry, ref: str) -> None:
    engine = Engine(dora_zoo, "tiny", mode="merge")
    ids = engine.runner.encode(Request(prompt="merged dora"))
    got = engine.logits([Request(prompt=ids, adapter=ref)])[0].logits
    assert engine.merged == dora_zoo.resolve(ref).ref
    torch.testing.assert_close(got, peft_logits(dora_zoo, "tiny", ref, ids, merged=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, peft_logits(dora_zoo, "tiny", ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["gather", "dense"])
def test_mixed_batch_rows_equal_solo_rows(dora_zoo: Registry, strategy: str) -> None:
    engine = Engine(dora_zoo, "tiny", lora_strategy=strategy)
    requests = [Request(prompt="a dora row", adapter="dora"), Request(prompt="lora", adapter="lora"),
                Request(prompt="soft prompt row", adapter="soft"), Request(prompt="base"),
                Request(prompt="the rank-8 dora", adapter="dora-r8"), Request(prompt="dora again", adapter="dora")]
    mixed = engine.logits(requests)
    for request, result in zip(requests, mixed, strict=True):
        solo = engine.logits([request])[0]
        torch.testing.assert_close(result.logits, solo.logits, atol=1e-5, rtol=0)


def test_lora_rows_are_bit_identical_next_to_dora_rows(dora_zoo: Registry) -> None:
    """A plain-LoRA row's factor is an exact 0, so sharing a batch with DoRA rows changes none of its bits."""
    engine = Engine(dora_zoo, "tiny")
    ids = engine.runner.encode(Request(prompt="same length"))
    alone = engine.logits([Request(prompt=ids, adapter="lora"), Request(prompt=ids, adapter="lora")])[0].logits
    mixed = engine.logits([Request(prompt=ids, adapter="lora"), Request(prompt=ids, adapter="dora")])[0].logits
    assert torch.equal(alone, mixed)


def test_unmerge_restores_the_base_bit_for_bit(dora_zoo: Registry) -> None:
    engine = Engine(dora_zoo, "tiny", mode="merge")
    engine.logits([Request(prompt="warm", adapter="lora")])
    engine.unmerge()
    before = {k: v.detach().clone() for k, v in engine.runner.model.state_dict().items()}
    for ref in ["dora", "lora", "dora-r8"]:
        engine.merge(ref)
    engine.unmerge()
    after = engine.runner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dora_installed_while_another_adapter_is_merged_uses_the_clean_weights(dora_zoo: Registry) -> None:
    engine = Engine(dora_zoo, "tiny", mode="merge")
    engine.merge("dora-r8")  # q_proj and o_proj now hold a merged DoRA weight
    engine.load("dora")  # computes its factors while dora-r8 is merged
    engine.set_mode("swap")
    ids = engine.runner.encode(Request(prompt="clean"))
    got = engine.logits([Request(prompt=ids, adapter="dora")])[0].logits
    torch.testing.assert_close(got, peft_logits(dora_zoo, "tiny", "dora", ids), atol=1e-5, rtol=0)


def test_static_decoder_equals_dynamic_decoder(dora_zoo: Registry) -> None:
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    requests = [Request(prompt="dora", adapter="dora", sampling=greedy),
                Request(prompt="plain lora", adapter="lora", sampling=greedy),
                Request(prompt="b", sampling=greedy), Request(prompt="r8", adapter="dora-r8", sampling=greedy)]
    dynamic = Engine(dora_zoo, "tiny", decoder="dynamic").generate(requests)
    static = Engine(dora_zoo, "tiny", decoder="static").generate(requests)
    assert [r.token_ids for r in static] == [r.token_ids for r in dynamic]


def test_the_stored_version_loads_in_peft_unchanged(dora_zoo: Registry) -> None:
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    _, path = dora_zoo.verified_path("dora", "tiny")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dora_zoo.base("tiny").path), path)
    assert cast(LoraConfig, model.peft_config["default"]).use_dora
    magnitudes = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 2 * 3  # two layers × three targets


@pytest.fixture(scope="module")
def gpt2_dora(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-dora")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with torch.no_grad():  # non-zero biases: DoRA scales W·x, not the bias
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(root / "gpt2")
    char_tokenizer(chat=False).save_pretrained(root / "gpt2")
    registry = Registry(root / "registry")
    registry.add_base("g", str(root / "gpt2"))
    registry.register_adapter("d", dora_dir(root / "gpt2", root / "d", 4, ["c_attn", "c_proj"], 5,
                                            fan_in_fan_out=True), "g", CardInfo(task_type="causal_lm"))
    return registry


def test_conv1d_with_bias_swap_and_merge_match_peft(gpt2_dora: Registry) -> None:
    swap = Engine(gpt2_dora, "g")
    ids = swap.runner.encode(Request(prompt="conv dora"))
    got = swap.logits([Request(prompt="x", adapter="d"), Request(prompt=ids, adapter="d")])[1].logits
    torch.testing.assert_close(got, peft_logits(gpt2_dora, "g", "d", ids), atol=1e-5, rtol=0)
    merged = Engine(gpt2_dora, "g", mode="merge").logits([Request(prompt=ids, adapter="d")])[0].logits
    torch.testing.assert_close(merged, peft_logits(gpt2_dora, "g", "d", ids, merged=True), atol=1e-5, rtol=0)


def test_exported_merged_model_equals_peft_merge(dora_zoo: Registry, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adapterhub_local.inference.merge import export_merged

    out = export_merged(dora_zoo, "dora", tmp_path / "merged")
    ids = Engine(dora_zoo, "tiny").runner.encode(Request(prompt="exported dora"))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, peft_logits(dora_zoo, "tiny", "dora", ids, merged=True), atol=1e-5, rtol=0)
