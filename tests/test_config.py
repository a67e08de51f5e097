"""Recipe parsing, overrides and static validation: every problem is collected into one error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local.config import (
    Recipe,
    apply_overrides,
    load_recipe,
    parse_recipe,
    qlora_problem,
    static_problems,
)
from adapterhub_local.errors import ConfigError

RECIPES = sorted(p for p in Path(__file__).resolve().parents[1].glob("recipes/*.yaml")
                 if p.read_text(encoding="utf-8").startswith("# adapterhub train "))


def _raw(tmp_path: Path, **sections: object) -> dict:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x", "label": "a"}\n', encoding="utf-8")
    raw: dict = {"name": "n", "base": "b", "data": {"train": str(data)}}
    for key, value in sections.items():
        raw[key] = value
    return raw


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_unknown_fields_are_named_with_their_section(tmp_path: Path) -> None:
    raw = _raw(tmp_path, learning_rate=1, method={"name": "lora", "rank": 4})
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, raw))
    message = str(info.value)
    assert "unknown field 'learning_rate'" in message
    assert "unknown field method.'rank'" in message or "method.'rank'" in message
    assert len(info.value.problems) == 2


def test_rank_zero_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method.r = 0: the LoRA rank must be at least 1"):
        load_recipe(_write(tmp_path, _raw(tmp_path, method={"name": "lora", "r": 0})))


def test_missing_file_is_named(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["data"]["validation"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"data.validation: file .*nope.jsonl does not exist"):
        load_recipe(_write(tmp_path, raw))


def test_qlora_refused_where_bitsandbytes_cannot_run(tmp_path: Path) -> None:
    reason = qlora_problem()
    if reason is None:
        pytest.skip("bitsandbytes can quantize here, so QLoRA is allowed")
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, _raw(tmp_path, method={"name": "qlora", "r": 4})))
    assert "qlora" in str(info.value) and "bitsandbytes" in str(info.value)
    assert "method.name=lora" in str(info.value)


def test_every_problem_is_listed_in_one_error(tmp_path: Path) -> None:
    raw = _raw(tmp_path, method={"name": "lora", "r": 0, "alpha": -1}, train={"lr": 0, "batch_size": 0},
               colour="red")
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, raw))
    assert len(info.value.problems) == 5
    assert str(len(info.value.problems)) + " problem(s)" in str(info.value)


def test_wrong_types_are_reported(tmp_path: Path) -> None:
    raw = _raw(tmp_path, train={"batch_size": "many", "epochs": "x"})
    _, problems = parse_recipe(raw)
    assert any("train.batch_size: expected an integer" in p for p in problems)
    assert any("train.epochs: expected a number" in p for p in problems)


def test_overrides_set_nested_values_and_are_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, _raw(tmp_path))
    recipe = load_recipe(path, {"method.r": "4", "train.lr": "1e-3", "method.target_modules": "[q_proj, v_proj]"})
    assert recipe.method.r == 4 and recipe.train.lr == pytest.approx(1e-3)
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"unknown field train\.'lrr'"):
        load_recipe(path, {"train.lrr": "1"})


def test_overrides_do_not_mutate_the_input() -> None:
    raw = {"train": {"lr": 1.0}}
    out = apply_overrides(raw, {"train.lr": "2"})
    assert raw == {"train": {"lr": 1.0}} and out == {"train": {"lr": 2}}


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 512), alpha=st.floats(0.1, 256), lr=st.floats(1e-6, 1.0), steps=st.integers(1, 10_000),
       rslora=st.booleans())
def test_round_trip_through_a_dict_is_exact(r: int, alpha: float, lr: float, steps: int, rslora: bool) -> None:
    recipe = Recipe(name="x", base="b")
    recipe.method = dataclasses.replace(recipe.method, r=r, alpha=alpha, use_rslora=rslora)
    recipe.train = dataclasses.replace(recipe.train, lr=lr, max_steps=steps)
    recipe.data.train = "asset:rotten_tomatoes"
    again, problems = parse_recipe(recipe.to_dict())
    assert again == recipe
    assert problems == static_problems(recipe)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_parse_and_name_their_command(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# adapterhub train recipes/{path.name}")
    recipe, problems = parse_recipe(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert recipe.name == path.stem
    assert [p for p in problems if "does not exist" not in p] == []
