"""SVD truncation: exact at full rank, optimal below it, consistent PEFT config, registered lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.lora import lora_pairs
from adapterhub_local.registry import Registry
from adapterhub_local.registry.cards import CardInfo
from adapterhub_local.sweep.analysis import svd
from adapterhub_local.sweep.truncate import truncate_and_register, truncate_tensors
from tests.peft_factory import save_lora


def _register(registry: Registry, base_dir: Path, tmp_path: Path, rank: int, **kwargs: object) -> str:
    out = tmp_path / f"lora-r{rank}"
    save_lora(base_dir, out, rank=rank, **kwargs)
    card = registry.register_adapter(f"ad-r{rank}", out, "tiny", CardInfo(task="t", metrics={"loss": 1.0}))
    return card.ref


def _deltas(tensors: dict[str, torch.Tensor], config: dict[str, object]) -> dict[str, torch.Tensor]:
    return {m: p.delta() for m, p in lora_pairs(tensors, config).items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_truncating_rank_64_to_64_reproduces_the_adapter(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path, rslora: bool
) -> None:
    ref = _register(llama_registry, tiny_llama_dir, tmp_path, rank=64, alpha=16)
    loaded = llama_registry.load_adapter(ref)
    config = {**loaded.config, "use_rslora": rslora}
    result = truncate_tensors(loaded.tensors, config, 64)
    assert result.config["r"] == 64
    before, after = _deltas(loaded.tensors, config), _deltas(result.tensors, result.config)
    assert before.keys() == after.keys()
    for module in before:
        assert torch.allclose(before[module], after[module], atol=1e-5, rtol=1e-4), module


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_truncation_is_the_best_rank_k_approximation(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path, rank: int
) -> None:
    ref = _register(llama_registry, tiny_llama_dir, tmp_path, rank=8)
    loaded = llama_registry.load_adapter(ref)
    result = truncate_tensors(loaded.tensors, dict(loaded.config), rank)
    for module, full in _deltas(loaded.tensors, dict(loaded.config)).items():
        cut = _deltas(result.tensors, result.config)[module]
        _, s, _ = svd(full)
        # Eckart–Young: the residual's Frobenius norm is exactly the dropped singular values.
        residual = torch.linalg.matrix_norm(full.double() - cut.double())
        assert torch.isclose(residual, s[rank:].norm(), rtol=1e-4, atol=1e-6)
        assert torch.linalg.matrix_rank(cut.double(), rtol=1e-6) == rank
        assert result.energy_kept[module] == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_truncated_adapter_registers_with_its_parent_and_loads_in_peft(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = _register(llama_registry, tiny_llama_dir, tmp_path, rank=8)
    card = truncate_and_register(llama_registry, ref, 2)
    assert card.parent == ref and card.rank == 2
    assert card.extra["truncation"]["from_rank"] == 8 and card.extra["truncation"]["to_rank"] == 2
    assert card.task == "t"
    assert llama_registry.resolve(card.ref).parent == ref
    # The registered directory is a PEFT adapter that PEFT reproduces: scale·B@A of the loaded model.
    _, path = llama_registry.verified_path(card.ref, "tiny")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), path)
    layer: Any = model.base_model.model.model.layers[0].self_attn.q_proj  # type: ignore[union-attr,index]
    peft_delta = layer.get_delta_weight("default")
    ours = _deltas(llama_registry.load_adapter(card.ref).tensors, {"r": 2, "lora_alpha": card.alpha})
    assert torch.allclose(peft_delta, ours["model.layers.0.self_attn.q_proj"], atol=1e-6)


def test_dora_adapters_are_refused_with_the_reason() -> None:
    from adapterhub_local.errors import UnsupportedError

    tensors = {"base_model.model.q.lora_A.weight": torch.ones(2, 4),
               "base_model.model.q.lora_B.weight": torch.ones(4, 2),
               "base_model.model.q.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(UnsupportedError, match="magnitude was trained for the norm of W \\+ ΔW with the full-rank"):
        truncate_tensors(tensors, {"r": 2, "lora_alpha": 2, "use_dora": True}, 1)


def test_embedding_lora_is_refused_and_token_rows_are_kept() -> None:
    from adapterhub_local.errors import UnsupportedError

    pair = {"base_model.model.q.lora_A.weight": torch.ones(2, 4), "base_model.model.q.lora_B.weight": torch.ones(4, 2)}
    embedding = {"base_model.model.emb.lora_embedding_A": torch.ones(2, 9),
                 "base_model.model.emb.lora_embedding_B": torch.ones(4, 2)}
    with pytest.raises(UnsupportedError, match="embedding LoRA"):
        truncate_tensors({**pair, **embedding}, {"r": 2, "lora_alpha": 2}, 1)
    rows = torch.randn(3, 4)
    kept = truncate_tensors({**pair, "base_model.model.emb.token_adapter.trainable_tokens_delta": rows},
                            {"r": 2, "lora_alpha": 2, "trainable_token_indices": [1, 2, 3]}, 1)
    assert torch.equal(kept.tensors["base_model.model.emb.token_adapter.trainable_tokens_delta"], rows)
