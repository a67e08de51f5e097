"""``adapterhub export --target vllm``: what vLLM loads, written only after vLLM's limits are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterhub_local.cli import main
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.export.vllm_export import EXPORT_RECORD, export_vllm
from adapterhub_local.registry import Registry
from adapterhub_local.registry.formats import load_tensors
from tests.peft_factory import save_lora, save_prompt


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def with_lora(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> Registry:
    save_lora(tiny_llama_dir, tmp_path / "lora")
    llama_registry.register_adapter("qa", tmp_path / "lora", "tiny")
    return llama_registry


def test_export_is_the_stored_weights_and_a_config_naming_the_served_base(with_lora: Registry, tmp_path: Path,
                                                                          tiny_llama_dir: Path) -> None:
    out = tmp_path / "vllm"
    result = export_vllm(with_lora, "qa", out, served_base="org/tiny-llama")
    card, stored = with_lora.verified_path("qa@1")
    assert (out / "adapter_model.safetensors").read_bytes() == (stored / "adapter_model.safetensors").read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["r"] == 4
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["content_hash"] == card.content_hash == result.content_hash
    assert result.max_lora_rank == record["max_lora_rank"] == 8
    # every tensor name is one vLLM's parse_fine_tuned_lora_name accepts
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in load_tensors(out / "adapter_model.safetensors"))
    # and PEFT loads the export to the same model as the stored version
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 3]])
    logits = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), d).eval()(ids).logits
              for d in (stored, out)]
    assert torch.equal(logits[0], logits[1])


def test_a_soft_prompt_is_refused_and_nothing_is_written(llama_registry: Registry, tiny_llama_dir: Path,
                                                         tmp_path: Path) -> None:
    save_prompt(tiny_llama_dir, tmp_path / "prompt")
    llama_registry.register_adapter("soft", tmp_path / "prompt", "tiny")
    with pytest.raises(UnsupportedError, match="soft prompt"):
        export_vllm(llama_registry, "soft", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_export_for_vllm_prints_the_rank_to_start_vllm_with(capsys: pytest.CaptureFixture[str],
                                                                 with_lora: Registry, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "-R", str(with_lora.root), "export", "qa@1", str(tmp_path / "v"), "--target", "vllm")
    assert code == 0 and "--max-lora-rank 8" in out and "qkv_proj" in out
    code, out, _ = run(capsys, "-R", str(with_lora.root), "export", "qa@1", str(tmp_path / "j"), "--target", "vllm",
                       "--json")
    assert code == 0 and json.loads(out)["max_lora_rank"] == 8
    code, _, err = run(capsys, "-R", str(with_lora.root), "export", "qa@1", str(tmp_path / "v"), "--target", "vllm")
    assert code != 0 and "not an empty directory" in err


def test_cli_refusal_is_one_line_with_the_reason(capsys: pytest.CaptureFixture[str], llama_registry: Registry,
                                                 tiny_llama_dir: Path, tmp_path: Path) -> None:
    save_prompt(tiny_llama_dir, tmp_path / "prompt")
    llama_registry.register_adapter("soft", tmp_path / "prompt", "tiny")
    code, _, err = run(capsys, "-R", str(llama_registry.root), "export", "soft", str(tmp_path / "o"), "--target",
                       "vllm")
    assert code != 0 and "soft prompt" in err and len(err.strip().splitlines()) == 1
