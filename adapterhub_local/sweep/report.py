"""The sweep report under ``runs/<sweep-id>/``: ``results.csv``, ``results.json``, ``results.md`` (one row
per rank, means over seeds), ``metric_vs_rank.png`` (log2 rank axis), ``params_vs_rank.png``, and the knee —
the smallest rank whose primary metric is within a stated tolerance of the best rank's.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Metrics where lower is better; every other numeric metric is taken as higher-is-better.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "ter", "wer")
# The primary metric, first present wins.
PRIMARY_ORDER = ("accuracy", "bleu", "rougeL", "rouge_l", "macro_f1", "val_loss")
TABLE_COLUMNS = ("val_loss", "test_loss", "accuracy", "macro_f1", "bleu", "rougeL", "rouge_l", "val_perplexity")


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

    def flat(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k not in ("metrics", "over_complete")}
        row["over_complete"] = ",".join(self.over_complete)
        row.update(self.metrics)
        return row

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointResult:
        return cls(**data)


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in _LOWER_IS_BETTER)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar numeric entries of a metrics dict (nested dicts like confusion matrices dropped)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def primary_metric(rows: list[PointResult]) -> str | None:
    present = {k for r in rows for k in r.metrics}
    return next((m for m in PRIMARY_ORDER if m in present), None)


def per_rank(rows: list[PointResult], series: str = "trained") -> list[dict[str, Any]]:
    """One row per rank: the mean over seeds of every numeric field (and the seed-std of the primary metric)."""
    by_rank: dict[int, list[PointResult]] = {}
    for row in rows:
        if row.series == series:
            by_rank.setdefault(row.rank, []).append(row)
    out = []
    for rank in sorted(by_rank):
        group = by_rank[rank]
        merged: dict[str, Any] = {"rank": rank, "seeds": len(group), "adapters": " ".join(r.adapter for r in group),
                                  "over_complete": bool(group[0].over_complete),
                                  "over_complete_modules": ",".join(group[0].over_complete),
                                  "alpha": group[0].alpha, "scale": group[0].scale}
        for key in ("trainable_params", "adapter_mb", "wall_s", "tokens_per_s", "peak_mem_mb"):
            values = [getattr(r, key) for r in group if getattr(r, key) is not None]
            merged[key] = statistics.fmean(values) if values else None
        for metric in sorted({k for r in group for k in r.metrics}):
            values = [r.metrics[metric] for r in group if metric in r.metrics]
            merged[metric] = statistics.fmean(values)
            if len(values) > 1:
                merged[f"{metric}_std"] = statistics.stdev(values)
        out.append(merged)
    return out


def knee(rank_rows: list[dict[str, Any]], metric: str, tolerance: float) -> int | None:
    """Smallest rank whose ``metric`` is within ``tolerance`` (relative) of the best rank's value."""
    points = [(r["rank"], r[metric]) for r in rank_rows if isinstance(r.get(metric), int | float)]
    if not points:
        return None
    if lower_is_better(metric):
        best = min(v for _, v in points)
        ok = [rank for rank, v in points if v <= best + abs(best) * tolerance]
    else:
        best = max(v for _, v in points)
        ok = [rank for rank, v in points if v >= best - abs(best) * tolerance]
    return min(ok)


def write_report(directory: Path, sweep_id: str, rows: list[PointResult], tolerance: float,
                 meta: dict[str, Any], knee_metric: str | None = None) -> dict[str, Any]:
    """Write every report file; returns the summary (knee, primary metric, paths)."""
    from adapterhub_local.sweep import plots

    directory.mkdir(parents=True, exist_ok=True)
    trained = per_rank(rows, "trained")
    truncated = per_rank(rows, "truncated")
    primary = knee_metric or primary_metric(rows)
    knee_rank = knee(trained, primary, tolerance) if primary else None
    summary = {"sweep_id": sweep_id, "primary_metric": primary, "tolerance": tolerance, "knee": knee_rank,
               "lower_is_better": lower_is_better(primary) if primary else None, **meta}
    flat = [r.flat() for r in rows]
    columns = sorted({k for row in flat for k in row}, key=_column_order)
    with (directory / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    (directory / "results.json").write_text(json.dumps(
        {"summary": summary, "per_rank": trained, "per_rank_truncated": truncated, "points": flat},
        indent=2, sort_keys=True, default=str), encoding="utf-8")
    metrics = [m for m in TABLE_COLUMNS if any(m in r for r in trained)]
    plots.metric_vs_rank(trained, metrics, directory / "metric_vs_rank.png", knee_rank,
                         {"truncated": truncated} if truncated else None)
    plots.params_vs_rank(trained, directory / "params_vs_rank.png")
    (directory / "results.md").write_text(markdown(summary, trained, truncated, metrics), encoding="utf-8")
    return summary


def _column_order(name: str) -> tuple[int, str]:
    first = ["series", "rank", "seed", "adapter", "alpha", "scale", "over_complete", *TABLE_COLUMNS,
             "trainable_params", "adapter_mb", "wall_s", "tokens_per_s", "peak_mem_mb", "mode"]
    return (first.index(name), name) if name in first else (len(first), name)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(summary: dict[str, Any], trained: list[dict[str, Any]], truncated: list[dict[str, Any]],
             metrics: list[str]) -> str:
    """``results.md``: the per-rank table, the knee, the truncated curve."""
    head = ["r", "alpha", *metrics, "trainable params", "adapter MB", "wall s", "tokens/s", "peak MB",
            "over-complete"]
    lines = [f"# Rank sweep `{summary['sweep_id']}`", ""]
    for key in ("recipe", "mode", "alpha_policy", "seeds", "steps", "command"):
        if summary.get(key) is not None:
            lines.append(f"- {key}: `{summary[key]}`")
    lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in trained:
        cells = [row["rank"], row["alpha"], *[row.get(m) for m in metrics], row.get("trainable_params"),
                 row.get("adapter_mb"), row.get("wall_s"), row.get("tokens_per_s"), row.get("peak_mem_mb"),
                 row.get("over_complete_modules") or ""]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines.append("")
    primary = summary.get("primary_metric")
    if primary and summary.get("knee") is not None:
        direction = "lowest" if summary.get("lower_is_better") else "highest"
        lines.append(f"**Knee: r = {summary['knee']}** — the smallest rank whose {primary} is within "
                     f"{summary['tolerance']:.1%} (relative) of the best ({direction}) {primary} of the sweep.")
    if any(r.get("over_complete") for r in trained):
        lines.append("")
        lines.append("Over-complete ranks (r > min(d_in, d_out) of a target module; the extra directions cannot "
                     "add rank to ΔW) were trained as asked and are marked in the last column.")
    if truncated:
        lines += ["", "## SVD-truncated from the highest trained rank", "",
                  "| r | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for row in truncated:
            lines.append(f"| {row['rank']} | " + " | ".join(_fmt(row.get(m)) for m in metrics) + " |")
    lines += ["", "![metric vs rank](metric_vs_rank.png)", "", "![params vs rank](params_vs_rank.png)", ""]
    return "\n".join(lines)
