"""Real bases from the packages named in DESIGN.md (slow: real weights, still small)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM

from adapterhub_local.assets import minilm_dir
from adapterhub_local.registry import BaseRecord, Registry
from adapterhub_local.registry.maintenance import export

pytestmark = pytest.mark.slow


def test_minilm_lora_round_trip(registry: Registry, tmp_path: Path) -> None:
    record = registry.add_base("minilm", str(minilm_dir()))
    assert record.architecture == "BertModel" and record.hidden_size == 384
    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(record.path),
                           LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False)).eval()
    model.save_pretrained(str(tmp_path / "lora"))
    registry.register_adapter("sent", tmp_path / "lora", "minilm")
    out = export(registry, "sent", tmp_path / "out")
    again = PeftModel.from_pretrained(AutoModel.from_pretrained(record.path), out).eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state)


def test_smollm2_gguf_is_converted_once_to_safetensors(smollm2_base: BaseRecord) -> None:
    record = smollm2_base  # converted by the session fixture through Registry.add_base
    assert record.source_kind == "gguf" and record.architecture == "LlamaForCausalLM"
    assert list(record.path.glob("*.safetensors")) and not list(record.path.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(record.path)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
