"""Sweep state: a directory resumes under the same plan, across versions that add recipe fields, and refuses
another plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.config import parse_recipe
from adapterhub_local.errors import ConfigError
from adapterhub_local.sweep.plan import SweepConfig, SweepPlan, plan_sweep
from adapterhub_local.sweep.state import STATE_FILE, SweepState

RAW = {"name": "e2e", "base": "b", "task": {"type": "generation"},
       "data": {"train": "asset:e2e", "template": "{mr}", "completion": "{ref}"},
       "method": {"name": "lora", "r": 4, "alpha": 32}}
DIMS = {"q_proj": (576, 576), "v_proj": (576, 192)}


def _plan(ranks: list[int], sweep_id: str | None = None) -> SweepPlan:
    recipe, problems = parse_recipe(RAW)
    assert not problems
    return plan_sweep(recipe, SweepConfig(ranks=ranks, sweep_id=sweep_id), DIMS)


def _age_state(path: Path) -> None:
    """Rewrite a state file as an older version wrote it: a recipe without one of today's fields."""
    data = json.loads(path.read_text())
    del data["plan"]["recipe"]["method"]["use_dora"]
    path.write_text(json.dumps(data))


def test_a_state_from_an_older_version_resumes(tmp_path: Path) -> None:
    SweepState.open(tmp_path, _plan([1, 2]))
    _age_state(tmp_path / STATE_FILE)
    SweepState.open(tmp_path, _plan([1, 2]))


def test_naming_the_sweep_explicitly_resumes_it(tmp_path: Path) -> None:
    first = _plan([1, 2])
    SweepState.open(tmp_path, first)
    SweepState.open(tmp_path, _plan([1, 2], sweep_id=first.sweep_id))


def test_another_plan_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    SweepState.open(tmp_path, _plan([1, 2]))
    with pytest.raises(ConfigError, match="different plan"):
        SweepState.open(tmp_path, _plan([1, 4]))
