"""``adapterhub train`` checks what it registered by default (``--no-check`` skips it): a DoRA generator (static
decoder included) and a BERT classifier pass, and ``show`` reports the result."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.tiny import World, make_world, run


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path / "w")


def test_train_checks_a_dora_generator_by_default(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "train", world.gen_recipe, "method.use_dora=true", "train.max_steps=2", "--json",
                 "--no-progress", "-R", world.reg)
    assert result.code == 0, result.err
    summary = result.json()
    parity = summary["parity"]
    assert parity["passed"] and {"swap", "mixed", "merge", "static_agreement"} <= set(parity["paths"])
    assert world.registry.load_adapter(summary["registered"]).config["use_dora"] is True
    shown = run(capsys, "show", summary["registered"], "--json", "-R", world.reg).json()
    assert shown["parity"]["passed"] is True and shown["parity"]["checks"] == 1


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_classifier_is_checked_with_the_pooling_it_was_trained_on(world: World, capsys: pytest.CaptureFixture[str],
                                                                   pooling: str) -> None:
    """The PEFT reference must read the pooling the head was trained on (mean for sentence-transformers bases):
    the real MiniLM recipe failed its check when the reference used the architecture's own pooler."""
    checked = run(capsys, "train", world.cls_recipe, "train.max_steps=2", f"task.pooling={pooling}", "--json",
                  "--no-progress", "-R", world.reg)
    assert checked.code == 0, checked.err
    assert checked.json()["parity"]["passed"]


def test_train_checks_a_classifier_and_no_check_skips(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    checked = run(capsys, "train", world.cls_recipe, "train.max_steps=2", "--json", "--no-progress", "-R", world.reg)
    assert checked.code == 0, checked.err
    assert checked.json()["parity"]["passed"] and "label_agreement" in checked.json()["parity"]["paths"]
    skipped = run(capsys, "train", world.cls_recipe, "train.max_steps=2", "train.seed=1", "--no-check", "--json",
                  "--no-progress", "-R", world.reg)
    assert skipped.code == 0, skipped.err
    assert skipped.json()["parity"] is None
