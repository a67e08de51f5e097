"""The report: knee rule, per-rank means over seeds, files."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_local.sweep.report import PointResult, knee, per_rank, write_report


def _row(rank: int, seed: int, **metrics: float) -> PointResult:
    return PointResult(rank=rank, seed=seed, adapter=f"a-r{rank}-s{seed}@1", alpha=8.0, scale=8.0 / rank,
                       metrics=dict(metrics), trainable_params=100 * rank)


def test_knee_is_smallest_rank_within_tolerance_of_best() -> None:
    rows = [{"rank": 1, "accuracy": 0.70}, {"rank": 2, "accuracy": 0.795}, {"rank": 4, "accuracy": 0.80},
            {"rank": 8, "accuracy": 0.79}]
    assert knee(rows, "accuracy", 0.01) == 2
    assert knee(rows, "accuracy", 0.0) == 4
    losses = [{"rank": 1, "val_loss": 1.30}, {"rank": 2, "val_loss": 1.17}, {"rank": 4, "val_loss": 1.16}]
    assert knee(losses, "val_loss", 0.01) == 2
    assert knee(losses, "val_loss", 0.5) == 1
    assert knee([], "val_loss", 0.01) is None


def test_per_rank_means_over_seeds() -> None:
    rows = [_row(1, 0, accuracy=0.6), _row(1, 1, accuracy=0.8), _row(2, 0, accuracy=0.9)]
    table = per_rank(rows)
    assert [r["rank"] for r in table] == [1, 2]
    assert table[0]["accuracy"] == pytest.approx(0.7) and table[0]["seeds"] == 2
    assert table[0]["accuracy_std"] == pytest.approx(0.1414, abs=1e-3)


def test_write_report_names_the_knee_and_marks_over_complete(tmp_path: Path) -> None:
    rows = [_row(r, 0, accuracy=a, val_loss=1 / a) for r, a in [(1, 0.5), (2, 0.8), (4, 0.81), (64, 0.8)]]
    rows[-1].over_complete = ["value"]
    summary = write_report(tmp_path, "sw", rows, 0.02, {"recipe": "x"})
    assert summary["knee"] == 2 and summary["primary_metric"] == "accuracy"
    text = (tmp_path / "results.md").read_text()
    assert "Knee: r = 2" in text and "value" in text and "Over-complete" in text
    assert len((tmp_path / "results.csv").read_text().strip().splitlines()) == 5
