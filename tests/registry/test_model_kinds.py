"""Kinds ``full`` and ``head``: registered with the adapters' guarantees (sha256 of every file, references,
index, base fingerprint), refused when they are not what they claim (another base, pickle, a head that
moves the backbone), and never handed to the adapter loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from adapterhub_local.errors import (
    FormatError,
    IntegrityError,
    ShapeMismatchError,
    UnsupportedError,
)
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.maintenance import export
from adapterhub_local.registry.model_kinds import full_model_dir, register_full, register_head

INFO = CardInfo(task="sentiment", task_type="sequence_classification", recipe={"name": "x"},
                dataset_fingerprint="d" * 64, metrics={"accuracy": 0.75}, labels=["negative", "positive"],
                extra={"pooling": "mean", "method": "full"})


@pytest.fixture
def bert_base(registry: Registry, tiny_bert_dir: Path) -> Registry:
    registry.add_base("bert", str(tiny_bert_dir))
    return registry


def fine_tune(base_dir: Path, out: Path, seed: int = 1) -> Path:
    """A 'fine-tuned' classifier of ``base_dir``: every weight moved, a new head, saved by transformers."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(str(out))
    return out


def test_a_full_fine_tune_is_a_version_with_integrity_and_lineage(bert_base: Registry, tiny_bert_dir: Path,
                                                                   tmp_path: Path) -> None:
    source = fine_tune(tiny_bert_dir, tmp_path / "ft")
    card = register_full(bert_base, "sent-full", source, "bert", INFO)
    assert card.ref == "sent-full@1" and card.kind == "full"
    assert card.base_fingerprint == bert_base.base("bert").fingerprint
    assert card.metrics == {"accuracy": 0.75} and card.dataset_fingerprint == "d" * 64
    assert card.labels == ["negative", "positive"] and card.extra["pooling"] == "mean"
    again = register_full(bert_base, "sent-full", fine_tune(tiny_bert_dir, tmp_path / "ft2", seed=2), "bert", INFO)
    assert again.version == 2
    bert_base.tag("sent-full@1", "prod")
    sha = card.files["model.safetensors"]
    for ref in ("sent-full@1", "sent-full:prod", f"sha256:{sha[:12]}"):
        resolved, path = full_model_dir(bert_base, ref)
        assert resolved.version == 1
        assert sorted(os.listdir(path)) == ["card.json", "config.json", "model.safetensors"]
    assert full_model_dir(bert_base, "sent-full")[0].version == 2
    rows = bert_base.list_adapters("sent-full")
    assert [(r.kind, r.sha256) for r in rows] == [("full", sha), ("full", again.files["model.safetensors"])]
    loaded = AutoModelForSequenceClassification.from_pretrained(str(full_model_dir(bert_base, "sent-full@1")[1]))
    original = AutoModelForSequenceClassification.from_pretrained(str(source))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values(),
                                                 strict=True))


def test_a_damaged_full_version_is_refused_on_load(bert_base: Registry, tiny_bert_dir: Path, tmp_path: Path) -> None:
    card = register_full(bert_base, "sent-full", fine_tune(tiny_bert_dir, tmp_path / "ft"), "bert", INFO)
    weights = bert_base.path_of(card) / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert any("does not match its sha256" in p for p in bert_base.check_files(card))
    with pytest.raises(IntegrityError, match="sent-full@1"):
        full_model_dir(bert_base, "sent-full@1")


def test_a_fine_tune_of_another_base_is_refused(bert_base: Registry, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    config.num_labels = 2  # a property, not a declared field of the config dataclass
    wider = BertForSequenceClassification(config)
    wider.save_pretrained(str(tmp_path / "wider"))
    with pytest.raises(ShapeMismatchError, match="not a fine-tune of base 'bert'"):
        register_full(bert_base, "other", tmp_path / "wider", "bert", INFO)
    assert bert_base.list_adapters() == []


def test_pickle_and_incomplete_directories_are_refused(bert_base: Registry, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(FormatError, match="pickle"):
        register_full(bert_base, "p", pickled, "bert", INFO)
    with pytest.raises(FormatError, match=r"no model\.safetensors"):
        register_full(bert_base, "p", tmp_path / "nowhere", "bert", INFO)


def test_a_full_version_is_not_loaded_as_an_adapter(bert_base: Registry, tiny_bert_dir: Path, tmp_path: Path) -> None:
    register_full(bert_base, "sent-full", fine_tune(tiny_bert_dir, tmp_path / "ft"), "bert", INFO)
    with pytest.raises(UnsupportedError, match="full fine-tune"):
        bert_base.load_adapter("sent-full@1")


def _head_dir(base_dir: Path, out: Path, move_backbone: bool) -> Path:
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["query"], layers_to_transform=[0], task_type="SEQ_CLS",
                        modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name or (move_backbone and "lora_B" in name):
                param.add_(0.1)
    peft_model.save_pretrained(str(out))
    return out


def test_a_head_only_classifier_is_kind_head_and_must_not_move_the_backbone(bert_base: Registry, tiny_bert_dir: Path,
                                                                            tmp_path: Path) -> None:
    card = register_head(bert_base, "sent-head", _head_dir(tiny_bert_dir, tmp_path / "h", False), "bert", INFO)
    assert card.kind == "head" and "classifier" in card.modules_to_save and card.rank == 1
    assert bert_base.load_adapter("sent-head@1").card.kind == "head"  # a PEFT directory: adapters' loader reads it
    assert bert_base.check_files(card) == []
    with pytest.raises(FormatError, match="changes the backbone"):
        register_head(bert_base, "sent-head", _head_dir(tiny_bert_dir, tmp_path / "moved", True), "bert", INFO)
    assert [r.version for r in bert_base.list_adapters("sent-head")] == [1]


def test_a_full_version_exports_as_a_plain_transformers_directory(bert_base: Registry, tiny_bert_dir: Path,
                                                                   tmp_path: Path) -> None:
    source = fine_tune(tiny_bert_dir, tmp_path / "ft")
    register_full(bert_base, "sent-full", source, "bert", INFO)
    out = export(bert_base, "sent-full@1", tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert AutoModelForSequenceClassification.from_pretrained(str(out)).config.num_labels == 2
