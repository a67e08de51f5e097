"""From a sweep's rows to its verdicts: sanity flags on every run, per-rank spread over seeds, per-seed bootstrap
intervals over examples, and the knee test (:mod:`adapterhub_local.sweep.stats`) on the unflagged runs —
once per data fraction and series (trained, truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapterhub_local.sweep import stats
from adapterhub_local.sweep.report_rows import PointResult, lower_is_better
from adapterhub_local.sweep.sanity import flags_of


def flag_rows(rows: list[PointResult], primary: str | None) -> None:
    """Set ``row.flags`` on every row (in place)."""
    for row in rows:
        row.flags = flags_of(row.metrics, row.per_example, row.facts, primary)


@dataclass
class RankSummary:
    """One rank of one series and data fraction: the metric over seeds, per-seed intervals, flags."""

    rank: int
    spread: stats.SeedSpread | None
    seed_intervals: dict[int, stats.Interval] = field(default_factory=dict)
    seed_values: dict[int, float] = field(default_factory=dict)
    flags: dict[int, list[str]] = field(default_factory=dict)
    """Seed → its sanity flags (flagged seeds only)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "spread": None if self.spread is None else self.spread.__dict__,
            "seed_values": self.seed_values,
            "seed_intervals": {s: [i.low, i.high] for s, i in self.seed_intervals.items()},
            "flags": self.flags,
        }


@dataclass
class SeriesVerdict:
    """Everything the report says about one (series, data fraction)."""

    series: str
    fraction: float
    metric: str
    ranks: list[RankSummary]
    verdict: stats.Verdict

    def to_dict(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "series": self.series, "fraction": self.fraction, "metric": self.metric, "knee": v.knee,
            "best": v.best, "separable": v.separable, "test": v.test, "confidence": v.confidence,
            "margin": v.margin, "reason": v.reason, "statement": v.statement(),
            "worse": v.worse, "deficit_low": v.deficit_low, "excluded": v.excluded,
            "rank_interval": {r: [i.low, i.high] for r, i in v.rank_interval.items()},
            "ranks": [r.to_dict() for r in self.ranks],
        }


def judge(rows: list[PointResult], metric: str, tolerance: float, *, series: str = "trained",
          fraction: float = 1.0, seed: int = 0) -> SeriesVerdict:
    """Spread, intervals and the knee of ``metric`` over the rows of one series and fraction (flags already set)."""
    chosen = [r for r in rows if r.series == series and r.fraction == fraction]
    lower = lower_is_better(metric)
    by_rank: dict[int, list[PointResult]] = {}
    for row in chosen:
        by_rank.setdefault(row.rank, []).append(row)
    matrices = {id(r): stats.per_example_matrix(metric, r.per_example) for r in chosen}
    # Pair over examples only when every run kept them; otherwise compare on seeds alone (n = 1 per run).
    per_example = all(m is not None for m in matrices.values())
    summaries: list[RankSummary] = []
    runs: dict[int, list[np.ndarray]] = {}
    statistic: stats.Statistic = stats.mean_statistic
    excluded: dict[int, str] = {}
    for rank in sorted(by_rank):
        group = sorted(by_rank[rank], key=lambda r: r.seed)
        values = {r.seed: r.metrics[metric] for r in group if stats.finite(r.metrics.get(metric))}
        summary = RankSummary(rank, stats.spread(list(values.values())) if values else None,
                              seed_values=values, flags={r.seed: r.flags for r in group if r.flags})
        usable = []
        for row in group:
            found = matrices[id(row)]
            if found is not None:
                matrix, statistic = found
                summary.seed_intervals[row.seed] = stats.bootstrap_ci(matrix, statistic, seed=seed + row.seed)
                if per_example and not row.flags:
                    usable.append(matrix)
            elif not per_example and not row.flags and row.seed in values:
                usable.append(np.array([[values[row.seed]]]))
        if usable:
            runs[rank] = usable
        else:
            excluded[rank] = "every run flagged" if group and all(r.flags for r in group) else "no usable score"
        summaries.append(summary)
    if not per_example:
        statistic = stats.mean_statistic
    if not per_example and all(len(v) < 2 for v in runs.values()):
        # One score per rank and nothing to resample: no estimate of the noise, so no verdict.
        verdict = stats.Verdict(metric, "none", stats.CONFIDENCE, 0.0, reason=(
            f"{metric} has no per-example scores and each rank has one seed, so its noise cannot be estimated; "
            "judge on a metric the evaluation scores per example, or give several --seeds"))
    else:
        verdict = stats.knee_test(runs, statistic, metric, lower_is_better=lower, tolerance=tolerance, seed=seed)
    if not per_example:
        verdict.test = "bootstrap over seeds only (these runs kept no per-example scores)"
    verdict.excluded = excluded
    if len(runs) < 2 and excluded:
        verdict.reason = (f"{len(runs)} rank(s) left to compare after leaving out "
                          + ", ".join(f"r={r} ({why})" for r, why in sorted(excluded.items())))
    return SeriesVerdict(series, fraction, metric, summaries, verdict)
