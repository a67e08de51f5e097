"""Pooling: the token rules ignore padding, ``auto`` follows what a sentence-transformers base declares, and
:class:`PooledClassifier` is the transformers classifier with another head input (same names, same objects)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from adapterhub_local.errors import FormatError, UnsupportedError
from adapterhub_local.pooling import (
    PooledClassifier,
    declared_pooling,
    pool,
    resolve_pooling,
    sentence_transformers_files,
    unwrap,
    with_pooling,
)
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_bert


def declare(directory: Path, **flags: bool) -> Path:
    """Write sentence-transformers' modules.json and a Pooling config with ``flags`` into ``directory``."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (directory / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              **{f"pooling_mode_{k}": v for k, v in flags.items()}}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_pooling_a_padded_row_equals_pooling_it_alone(pooling: str) -> None:
    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    hidden = torch.randn(len(lengths), 7, 6)
    mask = torch.zeros(len(lengths), 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batched = pool(hidden, mask, pooling)
    for i, n in enumerate(lengths):
        alone = pool(hidden[i : i + 1, :n], mask[i : i + 1, :n], pooling)
        assert torch.allclose(batched[i], alone[0], atol=1e-6)
        expected = {"cls": hidden[i, 0], "last": hidden[i, n - 1], "mean": hidden[i, :n].mean(0)}[pooling]
        assert torch.allclose(batched[i], expected, atol=1e-6)


def test_left_padding_is_pooled_by_the_mask_too() -> None:
    hidden = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[0, 1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "cls")[0], hidden[0, 1])
    assert torch.equal(pool(hidden, mask, "last")[0], hidden[0, 2])
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, 1:3].mean(0))


@pytest.mark.parametrize(("flags", "expected"), [
    ({"mean_tokens": True}, "mean"), ({"cls_token": True}, "cls"), ({"lasttoken": True}, "last"),
    ({"max_tokens": True}, "max"), ({"mean_tokens": True, "max_tokens": True}, "mean+max"), ({}, None),
])
def test_declared_pooling_reads_the_sentence_transformers_config(tmp_path: Path, flags: dict[str, bool],
                                                                 expected: str | None) -> None:
    assert declared_pooling(declare(tmp_path, **flags)) == expected


def test_auto_follows_the_declaration_and_native_is_the_fallback(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve_pooling("auto", plain) == "native"
    declared = tmp_path / "st"
    declared.mkdir()
    assert resolve_pooling("auto", declare(declared, cls_token=True)) == "cls"
    assert resolve_pooling("mean", plain) == "mean"  # an explicit choice wins
    with pytest.raises(UnsupportedError, match="max"):
        resolve_pooling("auto", declare(plain, max_tokens=True))
    with pytest.raises(UnsupportedError, match="unknown pooling"):
        resolve_pooling("median", plain)


def test_a_malformed_or_escaping_declaration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FormatError, match=r"modules\.json"):
        declared_pooling(tmp_path)
    modules = [{"path": "../elsewhere", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    with pytest.raises(FormatError, match="leaves the model directory"):
        sentence_transformers_files(tmp_path)


def test_a_registered_base_keeps_its_declared_pooling(tmp_path: Path) -> None:
    source = declare(make_tiny_bert(tmp_path / "st-bert"), mean_tokens=True)
    record = Registry(tmp_path / "registry").add_base("st", str(source))
    assert declared_pooling(record.path) == "mean"
    assert resolve_pooling("auto", record.path) == "mean"


def test_pooled_classifier_keeps_the_transformers_names_and_objects(tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(str(make_tiny_bert(tmp_path / "b")), num_labels=3)
    wrapped = PooledClassifier(model, "mean")
    theirs = dict(model.named_parameters())
    ours = dict(wrapped.named_parameters())
    assert set(ours) == set(theirs)
    assert all(ours[n] is theirs[n] for n in ours)
    assert unwrap(wrapped) is model and with_pooling(model, "native") is model
    ids = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    wrapped.eval()
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
        bert = cast(BertForSequenceClassification, model)
        hidden = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = bert.classifier(pool(hidden, mask, "mean"))
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert float(out.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(expected, torch.tensor([0, 2]))))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, out.logits)  # not the pooler


def test_pooled_classifier_refuses_what_it_cannot_pool(tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(str(make_tiny_bert(tmp_path / "b")), num_labels=2)
    with pytest.raises(UnsupportedError, match="native"):
        PooledClassifier(model, "native")
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32, 2))  # not a single linear head
    with pytest.raises(UnsupportedError, match="single linear"):
        PooledClassifier(model, "mean")
