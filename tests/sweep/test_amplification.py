"""ΔW against the frozen W (LoRA paper §7.3): the projections' invariants on constructed updates, the base weight
lookup, and ``compare`` reading the real base of registered adapters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.errors import FormatError, NotFoundError, UnsupportedError
from adapterhub_local.registry import Registry
from adapterhub_local.registry.cards import CardInfo
from adapterhub_local.sweep.amplification import (
    Amplification,
    default_k,
    module_amplification,
    summarise,
    weight_key,
)
from adapterhub_local.sweep.analysis import factored_svd
from adapterhub_local.sweep.compare import compare, comparison_markdown, write_comparison
from tests.peft_factory import lora_model


def _weight(d_out: int = 24, d_in: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)


def _figures(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0):  # type: ignore[no-untyped-def]
    u, s, vh = factored_svd(a, b, scale)
    return module_amplification("m", weight, u, s, vh, k)


def test_an_update_along_ws_top_directions_projects_to_ws_own_top_norm() -> None:
    weight = _weight()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    k = 3
    b = 0.5 * u[:, :k] * s[:k]  # ΔW = 0.5 · (W's best rank-3 part)
    row = _figures(weight, vh[:k], b, k)
    assert row.onto_delta == pytest.approx(row.onto_weight, rel=1e-10)
    assert row.onto_weight == pytest.approx(float(s[:k].norm()), rel=1e-10)
    assert row.delta_norm == pytest.approx(0.5 * float(s[:k].norm()), rel=1e-10)
    assert row.factor == pytest.approx(0.5, rel=1e-10)  # nothing amplified beyond W's own weight


def test_an_update_along_ws_weakest_directions_is_amplified() -> None:
    weight = _weight()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    b = u[:, -2:] * 10.0  # two of W's smallest directions, made large
    row = _figures(weight, vh[-2:], b, 2)
    assert row.onto_delta == pytest.approx(float(s[-2:].norm()), rel=1e-10)
    assert row.onto_delta < row.onto_weight
    assert row.factor == pytest.approx(10.0 * math.sqrt(2) / float(s[-2:].norm()), rel=1e-10)


def test_an_update_orthogonal_to_w_has_an_infinite_factor() -> None:
    weight = torch.zeros(8, 6, dtype=torch.float64)
    weight[:4, :3] = _weight(4, 3)  # W lives in the first 4 outputs × first 3 inputs
    a = torch.zeros(1, 6, dtype=torch.float64)
    a[0, 5] = 1.0
    b = torch.zeros(8, 1, dtype=torch.float64)
    b[7, 0] = 2.0
    row = _figures(weight, a, b, 1)
    assert row.onto_delta == 0.0 and math.isinf(row.factor) and row.delta_norm == pytest.approx(2.0)


def test_random_updates_project_like_the_random_baseline_on_average() -> None:
    weight = _weight(32, 20)
    generator = torch.Generator().manual_seed(1)
    squares = []
    for _ in range(400):
        a = torch.randn(2, 20, generator=generator, dtype=torch.float64)
        b = torch.randn(32, 2, generator=generator, dtype=torch.float64)
        row = _figures(weight, a, b, 2)
        squares.append(row.onto_delta ** 2)
    mean_square = sum(squares) / len(squares)
    assert math.sqrt(mean_square) == pytest.approx(row.onto_random, rel=0.08)
    assert row.onto_random == pytest.approx(2 * row.weight_norm / math.sqrt(32 * 20))


def test_k_is_capped_by_the_update_and_must_be_positive() -> None:
    weight = _weight()
    u, _, vh = torch.linalg.svd(weight, full_matrices=False)
    assert _figures(weight, vh[:2], u[:, :2], 50).k == 2
    with pytest.raises(Exception, match="at least 1"):
        _figures(weight, vh[:2], u[:, :2], 0)
    with pytest.raises(FormatError, match="does not match"):
        module_amplification("m", _weight(5, 5), *factored_svd(vh[:2], u[:, :2], 1.0), 2)
    assert default_k(8, 576, 192) == 8 and default_k(1024, 576, 192) == 48 and default_k(4, 2, 2) == 1


def test_weight_keys_match_on_whole_components_across_wrappers() -> None:
    keys = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.10.attention.self.query.weight",
            "model.layers.1.self_attn.q_proj.weight", "bert.pooler.dense.weight", "query.weight"]
    assert weight_key("bert.encoder.layer.0.attention.self.query", keys) == keys[0]  # classifier over a bare encoder
    assert weight_key("model.layers.1.self_attn.q_proj", keys) == keys[2]
    assert weight_key("pooler.dense", keys) == keys[3]  # the checkpoint carries the wrapper
    with pytest.raises(FormatError, match="no single base weight"):
        weight_key("encoder.layer.1.attention.self.query", keys)
    with pytest.raises(FormatError, match=r"matches: a\.x\.y\.weight, b\.x\.y\.weight"):
        weight_key("x.y", ["a.x.y.weight", "b.x.y.weight"])


def test_compare_projects_the_registered_base_weight_as_peft_sees_it(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    model = lora_model(tiny_llama_dir, rank=4, seed=3, alpha=16)
    model.save_pretrained(str(tmp_path / "lora"))
    ref = llama_registry.register_adapter("a", tmp_path / "lora", "tiny", CardInfo()).ref
    result = compare(llama_registry, [ref], projection_rank=2)
    (analysis,) = result.adapters
    assert analysis.amplification_note is None
    rows = {row.module: row for row in analysis.amplification}
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    assert len(rows) == len(layers) == 4
    for name, layer in layers.items():
        module = name.removeprefix("base_model.model.")
        weight = layer.base_layer.weight.detach().to(torch.float64)
        delta = layer.get_delta_weight("default").detach().to(torch.float64)
        u, _, vh = torch.linalg.svd(delta, full_matrices=False)
        expected = float(torch.linalg.matrix_norm(u[:, :2].T @ weight @ vh[:2].T))
        assert rows[module].k == 2
        assert rows[module].onto_delta == pytest.approx(expected, rel=1e-6)
        assert rows[module].delta_norm == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-6)
        assert rows[module].weight_norm == pytest.approx(float(torch.linalg.matrix_norm(weight)), rel=1e-6)
    assert set(summarise(analysis.amplification)) == {"q_proj", "v_proj"}
    written = write_comparison(result, tmp_path / "out")
    assert tmp_path / "out" / "amplification.png" in written
    assert "| q_proj | 2 |" in comparison_markdown(result)


def test_an_unreadable_base_is_noted_not_fatal(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora_model(tiny_llama_dir, rank=2).save_pretrained(str(tmp_path / "lora"))
    ref = llama_registry.register_adapter("a", tmp_path / "lora", "tiny", CardInfo()).ref

    def gone(name: str) -> None:
        raise NotFoundError(f"base {name!r} is not registered", "add it")

    monkeypatch.setattr(llama_registry, "base", gone)
    (analysis,) = compare(llama_registry, [ref]).adapters
    assert analysis.spectra and not analysis.amplification
    assert analysis.amplification_note is not None and "not registered" in analysis.amplification_note
    assert "not registered" in comparison_markdown(compare(llama_registry, [ref]))


def test_a_classifier_adapter_finds_the_bare_encoders_weights(sweep_registry: Registry, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = sweep_registry.base("tiny-enc")
    torch.manual_seed(4)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(str(base.path), num_labels=2),
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False,
                   task_type="SEQ_CLS", modules_to_save=["classifier"]))
    model.save_pretrained(str(tmp_path / "cls"))
    ref = sweep_registry.register_adapter(
        "cls", tmp_path / "cls", "tiny-enc",
        CardInfo(task="sentiment", task_type="sequence_classification", labels=["negative", "positive"])).ref
    (analysis,) = compare(sweep_registry, [ref]).adapters
    assert analysis.amplification_note is None
    modules = {row.module for row in analysis.amplification}
    assert modules and all(m.startswith("bert.encoder.layer.") for m in modules)  # the checkpoint has no "bert."
    layer = dict(model.named_modules())["base_model.model.bert.encoder.layer.1.attention.self.query"]
    row = next(r for r in analysis.amplification if r.module == "bert.encoder.layer.1.attention.self.query")
    assert row.weight_norm == pytest.approx(float(layer.base_layer.weight.double().norm()), rel=1e-6)


def test_the_summary_takes_the_median_factor_per_kind_of_module() -> None:
    def row(module: str, onto_delta: float) -> Amplification:
        return Amplification(module, 1, weight_norm=10.0, delta_norm=2.0, onto_delta=onto_delta, onto_weight=5.0,
                             onto_random=0.5)

    rows = [row("l.0.q_proj", 1.0), row("l.1.q_proj", 0.5), row("l.2.q_proj", 0.001), row("l.0.v_proj", 0.0)]
    summary = summarise(rows)
    assert summary["q_proj"]["factor"] == pytest.approx(4.0)  # factors 2, 4, 2000: one outlier does not decide
    assert summary["q_proj"]["onto_delta"] == pytest.approx(1.501 / 3) and summary["q_proj"]["modules"] == 3
    assert math.isinf(summary["v_proj"]["factor"])


def _merged_delta(model: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's own merge of one module: (W as [d_out, d_in], W' − W), float64."""
    layer = dict(model.named_modules())[name]
    before = layer.base_layer.weight.detach().clone().to(torch.float64)
    layer.merge()
    after = layer.base_layer.weight.detach().clone().to(torch.float64)
    layer.unmerge()
    if getattr(layer, "fan_in_fan_out", False):
        before, after = before.T, after.T
    return before, after - before


def test_a_dora_adapters_update_is_the_one_a_merge_applies(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                                      use_dora=True))
    with torch.no_grad():  # a magnitude that is not ‖W + ΔW‖ itself, so DoRA's rescaling matters
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.3 * torch.rand_like(param))
    model.save_pretrained(str(tmp_path / "dora"))
    ref = llama_registry.register_adapter("dora", tmp_path / "dora", "tiny", CardInfo()).ref
    (analysis,) = compare(llama_registry, [ref], projection_rank=2).adapters
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    _, delta = _merged_delta(model, name)
    module = name.removeprefix("base_model.model.")
    expected = torch.linalg.svdvals(delta)
    assert analysis.spectra[module].numerical_rank > 2  # the rescaling reaches beyond B·A's two directions
    ours = torch.tensor(analysis.spectra[module].singular_values, dtype=torch.float64)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6)
    row = next(r for r in analysis.amplification if r.module == module)
    assert row.delta_norm == pytest.approx(float(delta.norm()), rel=1e-4)


def test_a_dora_adapter_without_its_base_is_refused(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                   LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, use_dora=True)
                   ).save_pretrained(str(tmp_path / "dora"))
    ref = llama_registry.register_adapter("dora", tmp_path / "dora", "tiny", CardInfo()).ref

    def gone(name: str) -> None:
        raise NotFoundError(f"base {name!r} is not registered", "add it")

    monkeypatch.setattr(llama_registry, "base", gone)
    with pytest.raises(UnsupportedError, match="DoRA adapter: its update depends on the base weight"):
        compare(llama_registry, [ref])


def test_gpt2_conv1d_weights_are_read_as_d_out_by_d_in(registry: Registry, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(6)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "gpt2")
    registry.add_base("g", str(tmp_path / "gpt2"))
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2")),
                           LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True,
                                      init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "lora"))
    ref = registry.register_adapter("g-lora", tmp_path / "lora", "g", CardInfo()).ref
    (analysis,) = compare(registry, [ref], projection_rank=2).adapters
    assert analysis.amplification_note is None and len(analysis.amplification) == 2
    name = "base_model.model.transformer.h.0.attn.c_attn"
    weight, delta = _merged_delta(model, name)
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    row = next(r for r in analysis.amplification if r.module == name.removeprefix("base_model.model."))
    assert row.onto_delta == pytest.approx(float(torch.linalg.matrix_norm(u[:, :2].T @ weight @ vh[:2].T)), rel=1e-6)
    assert row.delta_norm == pytest.approx(float(delta.norm()), rel=1e-6)


def test_large_weights_get_their_top_singular_values_without_a_full_float64_svd(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_local.sweep import amplification

    generator = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(300, 200, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(240, 200, generator=generator, dtype=torch.float64))
    sigma = 10.0 / torch.arange(1, 201, dtype=torch.float64) ** 0.7  # a decaying spectrum, as trained weights have
    weight = (u * sigma) @ v.T
    monkeypatch.setattr(amplification, "EXACT_SPECTRUM_SIDE", 100)  # 240 > 100: not the exact float64 path
    calls: list[int] = []
    original = torch.svd_lowrank

    def counted(*a: Any, **kw: Any) -> Any:
        calls.append(kw["q"])
        return original(*a, **kw)

    monkeypatch.setattr(torch, "svd_lowrank", counted)
    before = torch.random.get_rng_state()
    top = amplification.top_singular_values(weight, 8)
    assert calls == [32] and torch.equal(torch.random.get_rng_state(), before)  # randomized, nobody's RNG consumed
    assert float(top.norm()) == pytest.approx(float(sigma[:8].norm()), rel=1e-4)
    assert torch.allclose(top, sigma[:8], rtol=1e-3)
    assert torch.equal(top, amplification.top_singular_values(weight, 8))  # the same figures every time
    wide = amplification.top_singular_values(weight, 40)  # a sketch over a quarter of the side: exact float32 SVD
    assert calls == [32, 32] and torch.allclose(wide, sigma[:40], rtol=1e-5)
