"""``adapterhub sweep-report``: the report of a sweep as it stands, from its state file alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.cli import main
from adapterhub_local.registry import Registry
from adapterhub_local.sweep.driver import run_sweep
from adapterhub_local.sweep.plan import SweepConfig
from adapterhub_local.sweep.state import STATE_FILE
from tests.sweep.conftest import recipe_for


def test_an_unfinished_sweep_is_reported_from_its_finished_points(
    sweep_registry: Registry, cls_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = recipe_for("cls", cls_data, tmp_path / "runs", max_steps=2)
    summary = run_sweep(sweep_registry, recipe, SweepConfig(ranks=[1, 2, 4], sweep_id="sw-interim"),
                        progress=False, log=lambda _: None)
    sweep_dir = Path(summary["directory"])
    state = json.loads((sweep_dir / STATE_FILE).read_text())
    unfinished = next(k for k in state["results"] if state["results"][k]["rank"] == 4)
    del state["results"][unfinished]  # as the state stands while r = 4 trains
    (sweep_dir / STATE_FILE).write_text(json.dumps(state))
    final_report = (sweep_dir / "results.md").read_text()
    capsys.readouterr()  # what training printed

    assert main(["sweep-report", str(sweep_dir), "--json"]) == 0
    interim = json.loads(capsys.readouterr().out)
    assert interim["progress"] == "2 of 3 planned points trained (interim report)"
    assert interim["ranks"] == [1, 2] and interim["directory"] == str(sweep_dir / "interim")
    points = json.loads((sweep_dir / "interim" / "results.json").read_text())["points"]
    assert sorted(p["rank"] for p in points) == [1, 2]
    assert "2 of 3 planned points" in (sweep_dir / "interim" / "results.md").read_text()
    assert (sweep_dir / "results.md").read_text() == final_report  # the sweep's own report is left alone


def test_a_directory_without_a_sweep_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep-report", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "holds no sweep" in err and "runs/<sweep-id>" in err
    (tmp_path / STATE_FILE).write_text("{not json")
    assert main(["sweep-report", str(tmp_path)]) != 0
    assert "not a sweep state file" in capsys.readouterr().err
