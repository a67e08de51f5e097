"""Data loading, field mapping, templates, group splits and fingerprints."""

from __future__ import annotations

import csv
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local.train import data
from tests.train.conftest import write_jsonl


@settings(max_examples=40, deadline=None)
@given(groups=st.lists(st.integers(0, 15), min_size=1, max_size=120), val=st.floats(0, 0.45),
       test=st.floats(0, 0.45), seed=st.integers(0, 5))
def test_group_split_is_a_partition_with_no_group_on_two_sides(groups: list[int], val: float, test: float,
                                                              seed: int) -> None:
    rows = [{"g": g, "i": i} for i, g in enumerate(groups)]
    tr, va, te = data.split_rows(rows, "g", val, test, seed)
    assert sorted(r["i"] for r in tr + va + te) == list(range(len(rows)))
    sides = [{r["g"] for r in part} for part in (tr, va, te)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert (tr, va, te) == data.split_rows(rows, "g", val, test, seed)


def test_row_split_reaches_its_fractions() -> None:
    rows = [{"i": i} for i in range(1000)]
    tr, va, te = data.split_rows(rows, None, 0.1, 0.2, 0)
    assert (len(tr), len(va), len(te)) == (700, 100, 200)


def test_jsonl_and_csv_read_the_same_rows(tmp_path: Path) -> None:
    rows = [{"mr": "name [ a ]", "ref": "there is a, pub"}, {"mr": "b", "ref": "c \"quoted\""}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    with (tmp_path / "x.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["mr", "ref"])
        writer.writeheader()
        writer.writerows(rows)
    assert data.read_rows(str(tmp_path / "x.jsonl")) == data.read_rows(str(tmp_path / "x.csv")) == rows


def test_rename_and_templates() -> None:
    rows = data.rename([{"meaning": "m", "sentence": "s"}], {"mr": "meaning", "ref": "sentence"})
    assert data.template_fields("{mr} => {ref}\n") == ["mr", "ref"]
    assert data.render("{mr} => {ref}", rows[0]) == "m => s"


def test_fingerprint_tracks_the_rows_used(tmp_path: Path) -> None:
    rows = [{"text": str(i), "label": "a", "movie": str(i % 3)} for i in range(30)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    kwargs = {"fmt": "auto", "mapping": {}, "split_by": "movie", "validation_fraction": 0.2,
              "test_fraction": 0.2, "seed": 0}
    first = data.fingerprint(data.load_splits(str(tmp_path / "a.jsonl"), None, None, **kwargs))  # type: ignore[arg-type]
    same = data.fingerprint(data.load_splits(str(tmp_path / "a.jsonl"), None, None, **kwargs))  # type: ignore[arg-type]
    rows[0]["text"] = "changed"
    write_jsonl(tmp_path / "a.jsonl", rows)
    changed = data.fingerprint(data.load_splits(str(tmp_path / "a.jsonl"), None, None, **kwargs))  # type: ignore[arg-type]
    other_seed = data.fingerprint(data.load_splits(str(tmp_path / "a.jsonl"), None, None,
                                                   **{**kwargs, "seed": 1}))  # type: ignore[arg-type]
    assert first == same and first != changed and changed != other_seed
