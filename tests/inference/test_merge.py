"""Merge mode: merged logits equal PEFT's merge_and_unload, unmerge restores the base bit for bit,
soft prompts refuse to merge, and the exported merged model loads with plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import Engine, Request
from adapterhub_local.inference.merge import export_merged
from adapterhub_local.registry import Registry


def peft_merged_logits(zoo: Registry, ref: str, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = zoo.verified_path(ref, "tiny")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base("tiny").path), path)
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        return merged(input_ids=torch.tensor([ids])).logits[0]


def snapshot(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.runner.model.state_dict().items()}


@pytest.mark.parametrize("ref", ["r4-qv", "r32-all"])
def test_merged_logits_match_peft_merge_and_unload(zoo: Registry, ref: str) -> None:
    engine = Engine(zoo, "tiny", mode="merge")
    ids = engine.runner.encode(Request(prompt="merge me"))
    got = engine.logits([Request(prompt=ids, adapter=ref)])[0].logits
    assert engine.merged == zoo.resolve(ref).ref
    torch.testing.assert_close(got, peft_merged_logits(zoo, ref, ids), atol=1e-5, rtol=0)


def test_unmerge_restores_every_base_tensor_bit_for_bit(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", mode="merge")
    engine.logits([Request(prompt="warm", adapter="r8-attn")])  # wrappers exist before the snapshot
    engine.unmerge()
    before = snapshot(engine)
    for ref in ["r32-all", "r1-q", "r64-ko"]:  # merge, then switch (unmerge + merge) twice
        engine.merge(ref)
        assert any(not torch.equal(before[k], v) for k, v in engine.runner.model.state_dict().items())
    engine.unmerge()
    after = engine.runner.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_switching_merged_adapters_equals_merging_the_second_alone(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", mode="merge")
    ids = engine.runner.encode(Request(prompt="switch"))
    engine.merge("r64-ko")
    switched = engine.logits([Request(prompt=ids, adapter="r16-mlp")])[0].logits
    fresh = Engine(zoo, "tiny", mode="merge").logits([Request(prompt=ids, adapter="r16-mlp")])[0].logits
    assert torch.equal(switched, fresh)


def test_merge_mode_equals_swap_mode_for_a_mixed_list(zoo: Registry) -> None:
    requests = [Request(prompt=p, adapter=a) for p, a in
                [("one", "r2-v"), ("two", None), ("three", "r32-all"), ("four", "r2-v")]]
    merged = Engine(zoo, "tiny", mode="merge").logits(requests)
    swapped = Engine(zoo, "tiny", mode="swap").logits(requests)
    for m, s in zip(merged, swapped, strict=True):
        torch.testing.assert_close(m.logits, s.logits, atol=1e-5, rtol=0)


def test_soft_prompts_cannot_be_merged(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", mode="merge")
    with pytest.raises(UnsupportedError, match="soft prompt"):
        engine.merge("soft")
    with pytest.raises(UnsupportedError, match="swap mode"):
        engine.logits([Request(prompt="hi", adapter="soft")])
    with pytest.raises(UnsupportedError, match="soft prompt"):
        export_merged(zoo, "soft", Path("unused"))


def test_exported_merged_model_loads_with_plain_transformers(zoo: Registry, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_merged(zoo, "r8-attn", tmp_path / "merged")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("exported")["input_ids"]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, peft_merged_logits(zoo, "r8-attn", ids), atol=1e-5, rtol=0)


def test_exported_classifier_keeps_head_and_labels(zoo: Registry, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    out = export_merged(zoo, "bert-cls", tmp_path / "cls")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    engine = Engine(zoo, "enc")
    ids = engine.runner.encode(Request(prompt="a fine film"))
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
    result = engine.classify([Request(prompt="a fine film", adapter="bert-cls")])[0]
    assert list(result.probabilities) == ["negative", "positive"]
    torch.testing.assert_close(torch.tensor(list(result.probabilities.values())), probs, atol=1e-5, rtol=0)
