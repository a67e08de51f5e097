"""``adapterhub train`` / ``adapterhub eval`` through the real command line on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adapterhub_local.cli import main
from adapterhub_local.registry import Registry
from tests.train.conftest import classification_rows, cls_raw, write_jsonl


def test_train_then_eval_from_the_command_line(tmp_path: Path, bert_registry: Registry, cls_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "tcls.yaml"
    recipe.write_text(yaml.safe_dump(cls_raw(cls_data, tmp_path / "runs")), encoding="utf-8")
    code = main(["-R", str(bert_registry.root), "train", str(recipe), "train.max_steps=4", "method.r=2", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out)  # --json: stdout is the JSON summary alone
    assert summary["registered"] == "tcls@1"
    assert bert_registry.resolve("tcls@1").rank == 2
    assert summary["training"]["steps"] == 4
    code = main(["-R", str(bert_registry.root), "eval", "tcls@1", "--data", str(cls_data), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["n"] == 72


def test_a_bad_recipe_fails_before_training_with_every_problem(tmp_path: Path, bert_registry: Registry,
                                                               cls_data: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    raw = cls_raw(cls_data, tmp_path / "runs")
    raw["data"]["template"] = "{review}"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = main(["-R", str(bert_registry.root), "train", str(recipe), "method.r=0", "train.colour=red"])
    err = capsys.readouterr().err
    assert code == 1
    assert "3 problem(s)" in err and "method.r = 0" in err and "'colour'" in err and "'review'" in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_full_fine_tune_is_trained_evaluated_and_predicted_from_the_command_line(
        tmp_path: Path, bert_registry: Registry, cls_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "full.yaml"
    raw = cls_raw(cls_data, tmp_path / "runs", name="full")
    raw["name"] = "tfull"
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    root = str(bert_registry.root)
    assert main(["-R", root, "train", str(recipe), "train.max_steps=3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["registered"] == "tfull@1"
    new_file = write_jsonl(tmp_path / "new.jsonl", classification_rows(2, 5))
    assert main(["-R", root, "eval", "tfull", "--data", str(new_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ref"] == "tfull@1" and result["n"] == 10 and 0 <= result["accuracy"] <= 1
    assert main(["-R", root, "predict", "tfull@1", "very good acting", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["adapter"] == "tfull@1" and predicted["label"] in ("negative", "positive")
    assert sum(predicted["probabilities"].values()) == pytest.approx(1.0)
    assert main(["-R", root, "list", "--json"]) == 0
    assert [row["kind"] for row in json.loads(capsys.readouterr().out)] == ["full"]
