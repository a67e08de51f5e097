"""``train.compile``: the auto rules, finding the blocks, switching compiled forwards on and off, and a compiled
run that equals the eager one (and resumes exactly)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file

from adapterhub_local.config import parse_recipe
from adapterhub_local.errors import ConfigError
from adapterhub_local.registry import Registry
from adapterhub_local.train import compilation, runner
from adapterhub_local.train.checks import check
from adapterhub_local.train.compilation import CompiledBlocks, decide, repeated_blocks
from tests.train.conftest import build_recipe, gen_raw

CPU = torch.device("cpu")
BIG = compilation.AUTO_MIN_PARAMS
LONG = compilation.AUTO_MIN_STEPS


@pytest.fixture
def tiny_llama(tiny_llama_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return model


@pytest.fixture
def with_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compilation, "cxx_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(compilation.sys, "platform", "linux")


def test_auto_compiles_long_cpu_runs_on_large_bases_only(with_compiler: None) -> None:
    assert decide("auto", device=CPU, steps=LONG, base_params=BIG, processes=1).enabled
    for steps, params, device, processes, why in [
        (LONG - 1, BIG, CPU, 1, "steps"),
        (LONG, BIG - 1, CPU, 1, "parameters"),
        (LONG, BIG, torch.device("cuda"), 1, "device cuda"),
        (LONG, BIG, CPU, 2, "2 processes"),
    ]:
        decision = decide("auto", device=device, steps=steps, base_params=params, processes=processes)
        assert not decision.enabled and why in decision.reason
    assert not decide("false", device=CPU, steps=LONG, base_params=BIG, processes=1).enabled
    assert decide("true", device=CPU, steps=1, base_params=1, processes=1).enabled
    with pytest.raises(ConfigError, match="2 processes") as info:
        decide("true", device=CPU, steps=LONG, base_params=BIG, processes=2)
    assert "train.compile: auto" in str(info.value)


def test_auto_stays_eager_and_true_refuses_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compilation, "cxx_compiler", lambda: None)
    decision = decide("auto", device=CPU, steps=LONG, base_params=BIG, processes=1)
    assert not decision.enabled and "no C++ compiler" in decision.reason
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler") as info:
        decide("true", device=CPU, steps=LONG, base_params=BIG, processes=1)
    assert "train.compile: false" in str(info.value)


@pytest.mark.parametrize(("value", "expected"), [(True, "true"), (False, "false"), ("auto", "auto"),
                                                 ("TRUE", "true")])
def test_recipe_accepts_yaml_booleans_and_words(value: object, expected: str) -> None:
    recipe, problems = parse_recipe({"name": "x", "base": "b", "task": {"type": "classification"},
                                     "data": {"train": "asset:sentiment"}, "train": {"compile": value}})
    assert not problems and recipe.train.compile == expected


def test_recipe_refuses_other_compile_values() -> None:
    _, problems = parse_recipe({"name": "x", "base": "b", "task": {"type": "classification"},
                                "data": {"train": "asset:sentiment"}, "train": {"compile": "sometimes"}})
    assert any("train.compile" in p and "auto, true, false" in p for p in problems)


def test_repeated_blocks_finds_the_transformer_layers(tiny_llama: torch.nn.Module) -> None:
    from transformers import LlamaForCausalLM

    blocks = repeated_blocks(tiny_llama)
    assert blocks and blocks == list(cast(LlamaForCausalLM, tiny_llama).model.layers)
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []
    mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)])
    assert repeated_blocks(torch.nn.Sequential(mixed)) == []


def test_switching_compiled_forwards_on_and_off(tiny_llama: torch.nn.Module) -> None:
    blocks = repeated_blocks(tiny_llama)
    keys = list(tiny_llama.state_dict())
    compiled = CompiledBlocks(blocks)
    compiled.on()
    assert all("forward" in vars(b) for b in blocks)
    with compiled.paused():
        assert not any("forward" in vars(b) for b in blocks)
    assert all("forward" in vars(b) for b in blocks)  # paused restores what was there
    compiled.off()
    assert not any("forward" in vars(b) for b in blocks)
    with compiled.paused():
        pass
    assert not any("forward" in vars(b) for b in blocks)  # and does not switch on what was off
    assert list(tiny_llama.state_dict()) == keys  # parameter names untouched (adapters save under them)
    CompiledBlocks([]).on()  # eager training: a no-op


def _adapter(result: runner.RunResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))


def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path: Path, llama_tok_registry: Registry,
                                                             gen_data: Path) -> None:
    raw = gen_raw(gen_data, tmp_path / "runs")
    raw["train"].update({"max_steps": 6, "eval_every": 3, "batch_size": 2, "precision": "fp32"})
    raw["method"]["dropout"] = 0.0
    raw["output"]["register"] = False
    raw["eval"]["forgetting"] = False
    eager_recipe = build_recipe({**raw, "train": {**raw["train"], "compile": False}})
    compiled_recipe = build_recipe({**raw, "train": {**raw["train"], "compile": True}})
    data = check(eager_recipe)
    eager = runner.run(eager_recipe, data, llama_tok_registry, run_dir=tmp_path / "eager", progress=False)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = runner.run(compiled_recipe, data, llama_tok_registry, run_dir=tmp_path / "compiled", progress=False)
    assert counters["frames"]["ok"] > 0  # the blocks really ran compiled
    a, b = _adapter(eager), _adapter(compiled)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key
    assert compiled.metrics["test_val_loss"] == pytest.approx(eager.metrics["test_val_loss"], rel=1e-4)

    def interrupt(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(compiled_recipe, data, llama_tok_registry, run_dir=tmp_path / "cut", progress=False,
                   on_step=interrupt)
    resumed = runner.run(compiled_recipe, data, llama_tok_registry, run_dir=tmp_path / "cut", resume=True,
                         progress=False)
    c = _adapter(resumed)
    for key in b:
        assert torch.equal(b[key], c[key]), key


def test_run_after_run_in_one_process_each_trains_compiled(tmp_path: Path, llama_tok_registry: Registry,
                                                            gen_data: Path) -> None:
    """A sequential sweep trains point after point in one process. Dynamo caches graphs per code object, which
    every block of every model shares: without a fresh cache per run, the runs' graphs piled up until dynamo's
    recompile limit and the later points trained eagerly, silently. A low limit makes that happen at once."""
    from torch._dynamo.utils import counters

    # torch's own patcher: pytest's monkeypatch deletes the option on undo, breaking later compiles
    with torch._dynamo.config.patch(recompile_limit=4):
        raw = gen_raw(gen_data, tmp_path / "runs")
        raw["train"].update({"max_steps": 2, "eval_every": 2, "batch_size": 2, "precision": "fp32", "compile": True})
        raw["output"]["register"] = False
        raw["eval"]["forgetting"] = False
        recipe = build_recipe(raw)
        data = check(recipe)
        for point in range(3):
            counters.clear()
            runner.run(recipe, data, llama_tok_registry, run_dir=tmp_path / f"point{point}", progress=False)
            assert counters["frames"]["ok"] > 0, f"point {point} trained eagerly"
