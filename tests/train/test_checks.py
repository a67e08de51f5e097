"""Data-aware recipe checks: templates naming missing fields, labels outside the label set, and one
error carrying static and data problems together."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapterhub_local.errors import ConfigError
from adapterhub_local.train.checks import load_and_check
from tests.train.conftest import cls_raw, gen_raw


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_template_naming_a_missing_field(tmp_path: Path, gen_data: Path) -> None:
    raw = gen_raw(gen_data, tmp_path / "runs")
    raw["data"]["template"] = "{meaning} :"
    with pytest.raises(ConfigError) as info:
        load_and_check(_write(tmp_path, raw))
    assert "data.template '{meaning} :' names field 'meaning'" in str(info.value)
    assert "mr" in str(info.value)  # the fields that do exist are listed


def test_label_outside_the_label_set(tmp_path: Path, cls_data: Path) -> None:
    raw = cls_raw(cls_data, tmp_path / "runs")
    raw["task"]["labels"] = ["negative", "neutral"]
    with pytest.raises(ConfigError) as info:
        load_and_check(_write(tmp_path, raw))
    assert "'positive' (36 rows) are outside the label set" in str(info.value)


def test_static_and_data_problems_come_together(tmp_path: Path, gen_data: Path) -> None:
    raw = gen_raw(gen_data, tmp_path / "runs", r=0)
    raw["data"]["completion"] = " {reference}"
    raw["data"]["split_by"] = "movie"
    with pytest.raises(ConfigError) as info:
        load_and_check(_write(tmp_path, raw))
    problems = info.value.problems
    assert any("method.r = 0" in p for p in problems)
    assert any("names field 'reference'" in p for p in problems)
    assert any("split_by names field 'movie'" in p for p in problems)


def test_field_mapping_to_a_missing_column(tmp_path: Path, cls_data: Path) -> None:
    raw = cls_raw(cls_data, tmp_path / "runs")
    raw["data"]["fields"] = {"text": "review"}
    with pytest.raises(ConfigError, match="'text' maps to column 'review'"):
        load_and_check(_write(tmp_path, raw))


def test_a_good_recipe_passes_with_clean_group_splits(tmp_path: Path, cls_data: Path) -> None:
    recipe, data = load_and_check(_write(tmp_path, cls_raw(cls_data, tmp_path / "runs")))
    splits = data.sources[0].splits
    movies = [{r["movie"] for r in rows} for rows in (splits.train, splits.validation, splits.test)]
    assert not (movies[0] & movies[1]) and not (movies[0] & movies[2]) and not (movies[1] & movies[2])
    assert data.labels == ["negative", "positive"] and recipe.name == "tcls"
    _, again = load_and_check(_write(tmp_path, cls_raw(cls_data, tmp_path / "runs")))
    assert again.fingerprint == data.fingerprint
