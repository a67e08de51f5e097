"""The report: per-rank spread over seeds, per-seed intervals, the knee or "not separable", sanity flags in the
table and out of the knee, rank × data size, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapterhub_local.sweep.report import PointResult, per_rank, write_report


def _row(rank: int, seed: int, **metrics: float) -> PointResult:
    return PointResult(rank=rank, seed=seed, adapter=f"a-r{rank}-s{seed}@1", alpha=8.0, scale=8.0 / rank,
                       metrics=dict(metrics), trainable_params=100 * rank)


def _classifier_row(rank: int, seed: int, accuracy: float, n: int = 400, fraction: float = 1.0,
                    labels: list[int] | None = None, predicted: list[int] | None = None) -> PointResult:
    """A run of a 2-class classifier with true accuracy ``accuracy`` on ``n`` balanced test examples."""
    rng = np.random.default_rng(1000 * rank + seed + int(100 * fraction))
    truth = labels if labels is not None else [i % 2 for i in range(n)]
    if predicted is None:
        correct = rng.random(n) < accuracy
        predicted = [t if c else 1 - t for t, c in zip(truth, correct, strict=True)]
    hits = [int(p == t) for p, t in zip(predicted, truth, strict=True)]
    row = _row(rank, seed, accuracy=sum(hits) / n)
    row.fraction = fraction
    row.per_example = {"label": truth, "predicted": predicted, "correct": hits}
    row.facts = {"steps": 20, "epochs": 0.5, "examples_seen": 320, "train_examples": 640, "data_fraction": fraction}
    return row


def test_per_rank_means_over_seeds() -> None:
    rows = [_row(1, 0, accuracy=0.6), _row(1, 1, accuracy=0.8), _row(2, 0, accuracy=0.9)]
    table = per_rank(rows)
    assert [r["rank"] for r in table] == [1, 2]
    assert table[0]["accuracy"] == pytest.approx(0.7) and table[0]["seeds"] == 2
    assert table[0]["accuracy_std"] == pytest.approx(0.1414, abs=1e-3)


def test_report_names_a_clear_knee_with_spread_intervals_and_facts(tmp_path: Path) -> None:
    rows = [_classifier_row(r, s, a) for r, a in [(1, 0.6), (2, 0.9), (4, 0.9), (64, 0.9)] for s in (0, 1)]
    for row in rows:
        if row.rank == 64:
            row.over_complete = ["value"]
    summary = write_report(tmp_path, "sw", rows, 0.0, {"recipe": "x"})
    assert summary["knee"] == 2 and summary["separable"] and summary["primary_metric"] == "accuracy"
    text = (tmp_path / "results.md").read_text()
    assert "Knee: r = 2" in text and "paired bootstrap" in text and "Over-complete" in text
    # mean ± std (min–max) over seeds, and every seed's own interval.
    r1 = per_rank(rows)[0]
    assert f"{r1['accuracy']:.4g} ± " in text and "s0: " in text and "s1: " in text
    data = json.loads((tmp_path / "results.json").read_text())
    ranks = data["verdicts"][0]["ranks"]
    assert all(len(r["seed_intervals"]) == 2 and r["spread"]["n"] == 2 for r in ranks)
    assert len((tmp_path / "results.csv").read_text().strip().splitlines()) == 9
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"steps", "epochs", "examples_seen", "train_examples", "data_fraction", "flags"} <= set(header)


def test_report_says_not_separable_when_ranks_share_a_distribution(tmp_path: Path) -> None:
    # Identical classifier quality at both ranks, different seeds: the report must not name a knee.
    rows = [_classifier_row(r, s, 0.7, n=200) for r in (1, 8) for s in (0, 1)]
    summary = write_report(tmp_path, "sw", rows, 0.0, {"recipe": "x"})
    assert summary["knee"] is None and not summary["separable"]
    assert "Knee: not separable" in (tmp_path / "results.md").read_text()


def test_a_collapsed_classifier_is_flagged_and_kept_out_of_the_knee(tmp_path: Path) -> None:
    # r=1 always answers class 0 (a collapsed classifier at the majority share); r=2 is a real but weak model.
    labels = [0] * 250 + [1] * 150
    rows = [_classifier_row(1, 0, 0.0, labels=labels, predicted=[0] * 400),
            _classifier_row(2, 0, 0.75, labels=labels), _classifier_row(4, 0, 0.95, labels=labels)]
    summary = write_report(tmp_path, "sw", rows, 0.0, {"recipe": "x"})
    assert rows[0].flags == ["below_baseline", "collapsed"] and not rows[1].flags and not rows[2].flags
    verdict = json.loads((tmp_path / "results.json").read_text())["verdicts"][0]
    assert "1" in verdict["excluded"] and summary["knee"] == 4
    text = (tmp_path / "results.md").read_text()
    assert "s0: below_baseline,collapsed" in text
    # Below the majority class (0.625 here) is flagged even when the classifier does not collapse.
    weak = _classifier_row(8, 0, 0.3, labels=labels)
    write_report(tmp_path / "weak", "sw", [weak, rows[2]], 0.0, {})
    assert weak.flags == ["below_baseline"]


def test_data_fractions_get_a_table_each_and_a_heatmap(tmp_path: Path) -> None:
    rows = [_classifier_row(r, 0, a + 0.2 * f, fraction=f) for f in (0.1, 1.0) for r, a in [(1, 0.55), (4, 0.7)]]
    summary = write_report(tmp_path, "sw", rows, 0.0, {})
    text = (tmp_path / "results.md").read_text()
    assert "## Data fraction 0.1" in text and "## Data fraction 1" in text
    assert summary["data_fractions"] == [0.1, 1.0]
    assert (tmp_path / "rank_by_data.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "results.json").read_text())["verdicts"]) == 2


def test_a_metric_without_per_example_scores_needs_seeds_for_a_verdict(tmp_path: Path) -> None:
    # val_loss is one number per run: with one seed per rank there is no noise estimate, so no knee...
    one = [_row(r, 0, val_loss=v) for r, v in [(1, 2.0), (2, 1.5), (4, 1.49)]]
    summary = write_report(tmp_path / "one", "sw", one, 0.0, {}, knee_metric="val_loss")
    assert summary["knee"] is None and "noise cannot be estimated" in summary["verdict"]
    # ...with seeds, the seeds are resampled: a clear gap between ranks is named.
    many = [_row(r, s, val_loss=v + 0.01 * s) for r, v in [(1, 2.0), (2, 1.5), (4, 1.49)] for s in range(4)]
    summary = write_report(tmp_path / "many", "sw", many, 0.02, {}, knee_metric="val_loss")
    assert summary["knee"] == 2 and "seeds only" in (tmp_path / "many" / "results.md").read_text()
