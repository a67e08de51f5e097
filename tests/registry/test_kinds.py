"""Adapter kinds beyond plain LoRA: classifier heads kept via ``modules_to_save``; bases from a hub id."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.maintenance import export


def test_classifier_head_travels_with_the_adapter(registry: Registry, tiny_bert_dir: Path, tmp_path: Path) -> None:
    registry.add_base("bert", str(tiny_bert_dir))
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                        init_lora_weights=False, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(str(tmp_path / "cls"))
    card = registry.register_adapter("cls", tmp_path / "cls", "bert", CardInfo(labels=["a", "b", "c"]))
    assert card.task_type == "sequence_classification" and "classifier" in card.modules_to_save
    out = export(registry, "cls", tmp_path / "out")
    torch.manual_seed(99)  # a different random head before loading: the stored head must replace it
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    ids = torch.tensor([[1, 5, 9, 2], [1, 7, 3, 2]])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_hub_base_records_revision(registry: Registry, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(repo_id: str, revision: str | None, local_dir: str, allow_patterns: list[str]) -> str:
        calls.append({"repo_id": repo_id, "revision": revision})
        for item in tiny_llama_dir.iterdir():
            shutil.copy2(item, Path(local_dir) / item.name)
        return local_dir

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    record = registry.add_base("hubby", "org/tiny-llama", revision="abc123")
    assert calls == [{"repo_id": "org/tiny-llama", "revision": "abc123"}]
    assert (record.source, record.source_kind, record.revision) == ("org/tiny-llama", "hub", "abc123")
