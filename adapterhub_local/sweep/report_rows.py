"""A sweep's rows: one :class:`PointResult` per trained (or truncated) adapter, which metric is primary and in
which direction it is better, and the per-rank means the tables and plots show.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Metrics where lower is better; every other numeric metric is taken as higher-is-better.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "ter", "wer")
# The primary metric, first present wins.
PRIMARY_ORDER = ("accuracy", "bleu", "rougeL", "rouge_l", "macro_f1", "val_loss")
TABLE_COLUMNS = ("val_loss", "test_loss", "accuracy", "macro_f1", "bleu", "nist", "meteor", "rougeL", "rouge_l",
                 "cider", "beam_bleu", "beam_nist", "beam_meteor", "beam_rougeL", "beam_cider", "val_perplexity")
FACTS = ("steps", "epochs", "examples_seen", "train_examples", "data_fraction")


@dataclass
class PointResult:
    """One trained (or truncated) adapter of a sweep, as a report row."""

    rank: int
    seed: int
    adapter: str
    """Registry reference ``name@version``."""
    alpha: float
    scale: float
    series: str = "trained"
    """``trained`` or ``truncated`` (SVD of the ``truncate_from`` adapter)."""
    mode: str = "sequential"
    over_complete: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Numeric metrics: validation ones prefixed ``val_`` (``val_loss``, ``val_accuracy`` …, at the kept best
    evaluation) and the held-out test ones (``test_loss``, accuracy, F1 / BLEU, ROUGE-L …)."""
    trainable_params: int | None = None
    adapter_mb: float | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mb: float | None = None
    fraction: float = 1.0
    """Fraction of the training rows the adapter (or its parent) was trained on."""
    per_example: dict[str, list[Any]] = field(default_factory=dict)
    """The evaluation's per-example record (see :mod:`adapterhub_local.train.evaluate`)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Run facts: steps, epochs, examples seen, training rows, data fraction, first / last training loss."""
    flags: list[str] = field(default_factory=list)
    """Sanity flags (:mod:`adapterhub_local.sweep.sanity`); set when the report is written."""

    def flat(self) -> dict[str, Any]:
        """A CSV row: every scalar field, the facts and metrics; the per-example record left out."""
        row = {k: v for k, v in asdict(self).items() if k not in ("metrics", "over_complete", "per_example", "facts",
                                                                  "flags")}
        row["over_complete"] = ",".join(self.over_complete)
        row["flags"] = ",".join(self.flags)
        row.update({k: v for k, v in self.facts.items() if k in FACTS})
        row.update(self.metrics)
        return row

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in _LOWER_IS_BETTER)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar numeric entries of a metrics dict (nested dicts like confusion matrices dropped)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def primary_metric(rows: list[PointResult]) -> str | None:
    present = {k for r in rows for k in r.metrics}
    return next((m for m in PRIMARY_ORDER if m in present), None)


def per_rank(rows: list[PointResult], series: str = "trained", fraction: float | None = None) -> list[dict[str, Any]]:
    """One row per rank (of one data fraction, or all): the mean over seeds of every numeric field and fact,
    the seed-std of every metric, the seeds' flags."""
    by_rank: dict[int, list[PointResult]] = {}
    for row in rows:
        if row.series == series and (fraction is None or row.fraction == fraction):
            by_rank.setdefault(row.rank, []).append(row)
    out = []
    for rank in sorted(by_rank):
        group = sorted(by_rank[rank], key=lambda r: r.seed)
        merged: dict[str, Any] = {"rank": rank, "seeds": len(group), "seed_list": [r.seed for r in group],
                                  "adapters": " ".join(r.adapter for r in group),
                                  "over_complete": bool(group[0].over_complete),
                                  "over_complete_modules": ",".join(group[0].over_complete),
                                  "alpha": group[0].alpha, "scale": group[0].scale, "fraction": group[0].fraction,
                                  "flags": "; ".join(f"s{r.seed}: {','.join(r.flags)}" for r in group if r.flags)}
        for key in ("trainable_params", "adapter_mb", "wall_s", "tokens_per_s", "peak_mem_mb"):
            values = [getattr(r, key) for r in group if getattr(r, key) is not None]
            merged[key] = statistics.fmean(values) if values else None
        for key in FACTS:
            values = [r.facts[key] for r in group if isinstance(r.facts.get(key), int | float)]
            merged[key] = statistics.fmean(values) if values else None
        for metric in sorted({k for r in group for k in r.metrics}):
            values = [r.metrics[metric] for r in group if metric in r.metrics]
            merged[metric] = statistics.fmean(values)
            if len(values) > 1:
                merged[f"{metric}_std"] = statistics.stdev(values)
        out.append(merged)
    return out
