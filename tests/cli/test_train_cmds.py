"""``adapterhub train`` overrides: positional ``key=value`` and ``--set key=value`` mean the same thing and can be
mixed; a malformed one fails before training, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_local.cli.train_cmds import planned_steps
from adapterhub_local.train.checks import load_and_check
from tests.cli.tiny import World, make_world, run


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path / "w")


@pytest.mark.parametrize("style", ["positional", "set", "mixed"])
def test_overrides_positional_or_set(world: World, style: str, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = {"positional": ["method.r=2", "train.max_steps=3"],
             "set": ["--set", "method.r=2", "--set", "train.max_steps=3"],
             "mixed": ["method.r=2", "--set", "train.max_steps=3"]}[style]
    result = run(capsys, "train", world.cls_recipe, *pairs, "--json", "--no-progress", "-R", world.reg)
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["training"]["steps"] == 3
    assert world.registry.resolve(summary["registered"]).rank == 2


def test_a_bad_set_fails_before_training(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "train", world.cls_recipe, "--set", "method.r", "-R", world.reg)
    assert result.code != 0 and "'method.r' has no '='" in result.err
    assert not (world.root / "runs").exists()


def test_planned_steps_match_what_the_run_takes(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, data = load_and_check(world.cls_recipe, {"train.max_steps": "", "train.epochs": "2",
                                                     "train.batch_size": "5"})
    planned = planned_steps(recipe, data)
    result = run(capsys, "train", world.cls_recipe, "train.max_steps=", "train.epochs=2", "train.batch_size=5",
                 "--json", "--no-progress", "-R", world.reg)
    assert result.code == 0, result.err
    assert result.json()["training"]["planned_steps"] == planned
