"""``adapterhub eval COMBINED``: each parent and the combination scored on every parent's held-out task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from adapterhub_local.cli import main
from tests.cli.tiny import World, make_world, run


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """``tgen@1`` and ``tgen2@1`` (two generation tasks: other templates), trained; ``mix@1`` = their cat."""
    made = make_world(tmp_path_factory.mktemp("compose-eval"))
    second = yaml.safe_load(made.gen_recipe.read_text())
    second.update(name="tgen2")
    second["data"].update(template="where : {mr} ?", completion=" {text} .")
    second["train"]["seed"] = 1
    recipe2 = Path(made.root / "tgen2.yaml")
    recipe2.write_text(yaml.safe_dump(second), encoding="utf-8")
    for recipe in (made.gen_recipe, recipe2):
        assert main(["-R", made.reg, "train", str(recipe), "--json", "--no-progress"]) == 0
    assert main(["-R", made.reg, "combine", "tgen", "tgen2", "--weights", "0.5,0.5", "--name", "mix"]) == 0
    return made


def test_eval_of_a_combination_scores_every_parent_task(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "eval", "mix", "--json", "-R", world.reg)
    assert result.code == 0, result.err
    body = result.json()
    assert body["models"] == ["tgen@1", "tgen2@1", "mix@1"] and body["skipped"] == []
    assert [(t["task"], t["parent"]) for t in body["tasks"]] == [("tgen", "tgen@1"), ("tgen2", "tgen2@1")]
    for task in body["tasks"]:
        assert set(task["scores"]) == {"tgen@1", "tgen2@1", "mix@1"}
        assert all(math.isfinite(s["loss"]) and "bleu" in s for s in task["scores"].values())
    # the held-out rows are the ones each parent was scored on when it was trained
    for task in body["tasks"]:
        card = world.registry.resolve(task["parent"])
        own = task["scores"][task["parent"]]
        assert task["n"] > 0
        assert own["loss"] == pytest.approx(card.metrics["test_val_loss"], abs=1e-5)
        assert own["bleu"] == pytest.approx(card.metrics["bleu"], abs=1e-9)
    table = run(capsys, "eval", "mix", "-R", world.reg)
    assert "mix@1 (combined)" in table.out and "tgen2 (" in table.out


def test_eval_without_data_refuses_a_plain_adapter(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "eval", "tgen", "-R", world.reg)
    assert result.code != 0 and "tgen@1 is not a combination" in result.err and "--data FILE" in result.err
