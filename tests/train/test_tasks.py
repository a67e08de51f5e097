"""Tokenized examples: loss only on completion tokens, packing keeps every target, weighted mixing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapterhub_local.train import tasks
from tests.train.conftest import generation_rows, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


SPEC = tasks.TemplateSpec("{mr} :", " {ref}", name="e2e")


def test_loss_is_on_completion_tokens_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for row in generation_rows(4, 2):
        example = tasks.encode_generation([row], SPEC, tokenizer, 64)[0]
        prompt_len = len(tokenizer(row["mr"] + " :")["input_ids"])
        assert example.labels[:prompt_len] == [tasks.IGNORE] * prompt_len  # type: ignore[index]
        assert example.labels[prompt_len:] == example.input_ids[prompt_len:]  # type: ignore[index]
        assert example.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_a_completion_target(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = tasks.encode_pair("name " * 40, "good movie", tokenizer, 16)
    assert len(example.input_ids) <= 16
    assert any(t != tasks.IGNORE for t in example.labels)  # type: ignore[union-attr]


def test_padding_is_masked_and_ignored(tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples = tasks.encode_generation(generation_rows(3, 1), SPEC, tokenizer, 64)
    batch = tasks.collate_generation(examples, 0)
    mask = batch.tensors["attention_mask"].bool()
    assert (batch.tensors["labels"][~mask] == tasks.IGNORE).all()
    assert batch.real_tokens == sum(len(e.input_ids) for e in examples)


def test_packing_keeps_every_target_token(tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples = tasks.encode_generation(generation_rows(8, 3), SPEC, tokenizer, 64)
    packed = tasks.pack(examples, 32)
    assert all(len(e.input_ids) <= 32 for e in packed)
    before = Counter(t for e in examples for t in e.labels if t != tasks.IGNORE)  # type: ignore[union-attr]
    after = Counter(t for e in packed for t in e.labels if t != tasks.IGNORE)  # type: ignore[union-attr]
    assert before == after
    assert sum(len(e.input_ids) for e in packed) <= sum(len(e.input_ids) for e in examples)


def test_generation_prompts_group_all_references() -> None:
    rows = generation_rows(5, 3)
    prompts = tasks.generation_prompts(rows, SPEC)
    assert len(prompts) == 5 and all(len(p.references) == 3 for p in prompts)


def test_mix_follows_the_weights() -> None:
    a = [tasks.Example([1], [1], "a") for _ in range(100)]
    b = [tasks.Example([2], [2], "b") for _ in range(20)]
    mixed = tasks.mix({"a": a, "b": b}, {"a": 1.0, "b": 3.0}, seed=0)
    counts = Counter(e.source for e in mixed)
    assert len(mixed) == 120 and counts["b"] == 90 and counts["a"] == 30
    assert mixed == tasks.mix({"a": a, "b": b}, {"a": 1.0, "b": 3.0}, seed=0)


def test_classification_examples_use_label_order(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = [{"text": "good movie", "label": "positive"}, {"text": "bad movie", "label": "negative"}]
    spec = tasks.TemplateSpec(None)
    examples = tasks.encode_classification(rows, spec, tokenizer, ["positive", "negative"], 16)
    assert [e.labels for e in examples] == [0, 1]
    batch = tasks.collate_classification(examples, tokenizer.pad_token_id)
    assert batch.tensors["labels"].tolist() == [0, 1]
