"""``compare``: self-similarity 1, pairs for every couple, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.registry import Registry
from adapterhub_local.registry.cards import CardInfo
from adapterhub_local.sweep.compare import compare, write_comparison
from tests.peft_factory import save_lora


def _register(registry: Registry, base_dir: Path, tmp_path: Path, name: str, rank: int, seed: int) -> str:
    out = tmp_path / name
    save_lora(base_dir, out, rank=rank, seed=seed)
    return registry.register_adapter(name, out, "tiny", CardInfo(metrics={"accuracy": 0.5 + seed / 100})).ref


def test_similarity_of_an_adapter_with_itself_is_one(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    ref = _register(llama_registry, tiny_llama_dir, tmp_path, "a", rank=4, seed=1)
    result = compare(llama_registry, [ref, ref])
    (pair,) = result.pairs
    summary = pair.summary()
    assert summary["modules"], "no modules compared"
    for grid in pair.grids.values():
        assert float(grid.min()) == pytest.approx(1.0, abs=1e-9)
    assert summary["phi_1_mean"] == pytest.approx(1.0) and summary["phi_k_mean"] == pytest.approx(1.0)


def test_different_adapters_compare_below_one_and_files_are_written(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    refs = [_register(llama_registry, tiny_llama_dir, tmp_path, f"a{i}", rank=2 + 2 * i, seed=i) for i in range(3)]
    result = compare(llama_registry, refs)
    assert len(result.pairs) == 3
    for pair in result.pairs:
        assert pair.summary()["phi_k_mean"] < 0.999
        for module, grid in pair.grids.items():
            rank_a = llama_registry.resolve(pair.a).rank
            assert grid.shape[0] == rank_a, module
    written = write_comparison(result, tmp_path / "out")
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [a["ref"] for a in data["adapters"]] == refs
    assert "accuracy" in (tmp_path / "out" / "compare.md").read_text()
