"""The unit of work (train/unit.py): a request round-trips as plain data, a tagged unit is idempotent (a retried
attempt returns the version an earlier attempt registered), other data or a non-registering recipe is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.errors import ConfigError
from adapterhub_local.registry import Registry
from adapterhub_local.train.unit import UnitRequest, UnitResult, open_registry, registry_location, run_unit
from tests.train.conftest import build_recipe, cls_raw


def test_a_tagged_unit_reuses_its_earlier_registration_and_round_trips(tmp_path: Path, bert_registry: Registry,
                                                                        cls_data: Path) -> None:
    recipe = build_recipe(cls_raw(cls_data, tmp_path / "runs"))
    recipe.output.tag = "sweep-x"
    request = UnitRequest(recipe, tmp_path / "runs" / "p", resume="auto", reuse_tagged=True, require_registered=True)
    assert UnitRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request  # plain data across processes
    first = run_unit(request, bert_registry)
    assert first.ref and not first.reused and first.metrics["accuracy"] >= 0
    assert UnitResult.from_dict(json.loads(json.dumps(first.to_dict()))).ref == first.ref
    # The same unit again (a retried task whose first attempt registered, then died): nothing is trained twice.
    again = run_unit(request, open_registry(registry_location(bert_registry)))
    assert again.reused and again.ref == first.ref and again.metrics == first.metrics
    assert len(bert_registry.list_adapters("tcls")) == 1
    # Another recipe under the same tag is a new adapter, not the earlier one.
    recipe.train.max_steps = 3
    other = run_unit(UnitRequest(recipe, tmp_path / "runs" / "q", reuse_tagged=True), bert_registry)
    assert not other.reused and other.ref != first.ref


def test_other_data_or_no_registration_is_refused(tmp_path: Path, bert_registry: Registry, cls_data: Path) -> None:
    recipe = build_recipe(cls_raw(cls_data, tmp_path / "runs"))
    with pytest.raises(ConfigError, match="fingerprint"):
        run_unit(UnitRequest(recipe, data_fingerprint="0" * 64), bert_registry)
    recipe.output.register = False
    with pytest.raises(ConfigError, match="does not register"):
        run_unit(UnitRequest(recipe, require_registered=True), bert_registry)
    with pytest.raises(ConfigError, match="resume"):
        run_unit(UnitRequest(recipe, resume="sometimes"), bert_registry)
    assert not bert_registry.list_adapters()
