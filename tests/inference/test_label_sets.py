"""Classifiers with different label sets (2, 3 and 5 labels) in one mixed batch: each row gets its own head and
labels, equals its solo run, and equals PEFT's sequence-classification model."""

from __future__ import annotations

import pytest
import torch

from adapterhub_local.inference import Engine, Request
from adapterhub_local.registry import CardInfo, Registry
from tests.inference.conftest import lora_dir, make_llama

LABELS = {"two": ["no", "yes"], "three": ["neg", "neu", "pos"], "five": ["1", "2", "3", "4", "5"]}


@pytest.fixture(scope="module")
def label_zoo(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("labels")
    registry = Registry(root / "registry")
    llama = make_llama(root / "llama")
    registry.add_base("tiny", str(llama))
    for seed, (name, labels) in enumerate(LABELS.items(), start=20):
        source = lora_dir(llama, root / name, 4, ["q_proj", "v_proj"], seed, task="SEQ_CLS", num_labels=len(labels))
        registry.register_adapter(name, source, "tiny",
                                  CardInfo(task=name, task_type="sequence_classification", labels=labels))
    return registry


def peft_logits(registry: Registry, ref: str, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, path = registry.verified_path(ref, "tiny")
    base = AutoModelForSequenceClassification.from_pretrained(registry.base("tiny").path, num_labels=len(LABELS[ref]),
                                                              pad_token_id=0)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, path).eval()(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("mode", ["swap", "merge"])
def test_two_three_and_five_labels_in_one_batch(label_zoo: Registry, mode: str) -> None:
    engine = Engine(label_zoo, "tiny", mode=mode)  # type: ignore[arg-type]
    requests = [Request(prompt="five stars", adapter="five"), Request(prompt="yes or no", adapter="two"),
                Request(prompt="a neutral, longer row of text", adapter="three"), Request(prompt="4", adapter="five")]
    mixed = engine.classify(requests)
    for request, result in zip(requests, mixed, strict=True):
        assert request.adapter is not None
        assert list(result.probabilities) == LABELS[request.adapter]
        solo = engine.classify([request])[0]
        torch.testing.assert_close(torch.tensor(result.logits), torch.tensor(solo.logits), atol=1e-5, rtol=0)
        expected = peft_logits(label_zoo, request.adapter, engine.runner.encode(request))
        torch.testing.assert_close(torch.tensor(result.logits), expected, atol=1e-5, rtol=0)
        assert result.label == LABELS[request.adapter][int(expected.argmax())]
