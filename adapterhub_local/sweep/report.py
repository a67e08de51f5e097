"""The sweep report under ``runs/<sweep-id>/``: ``results.csv`` (one row per run), ``results.json`` (summary,
verdicts, per-rank rows), ``results.md`` (per data fraction: a table with the primary metric's mean, std and
min–max over seeds, each seed's bootstrap interval, the other metrics, the run facts and the sanity flags;
then the knee or "not separable"), ``metric_vs_rank.png`` (error bars), ``params_vs_rank.png`` and, with
several data fractions, ``rank_by_data.png`` (a heatmap).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from adapterhub_local.sweep.report_rows import (
    FACTS,
    PRIMARY_ORDER,
    TABLE_COLUMNS,
    PointResult,
    lower_is_better,
    numeric_metrics,
    per_rank,
    primary_metric,
)
from adapterhub_local.sweep.sanity import DIVERGED_FACTOR, MIN_STOPPED
from adapterhub_local.sweep.verdict import SeriesVerdict, flag_rows, judge

__all__ = ["PRIMARY_ORDER", "PointResult", "lower_is_better", "numeric_metrics", "per_rank", "primary_metric",
           "write_report"]


def write_report(directory: Path, sweep_id: str, rows: list[PointResult], tolerance: float,
                 meta: dict[str, Any], knee_metric: str | None = None,
                 advice: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every report file; returns the summary (knee, verdicts, primary metric, paths)."""
    from adapterhub_local.sweep import plots

    directory.mkdir(parents=True, exist_ok=True)
    primary = knee_metric or primary_metric(rows)
    flag_rows(rows, primary)
    fractions = sorted({r.fraction for r in rows if r.series == "trained"}) or [1.0]
    verdicts: list[SeriesVerdict] = []
    if primary:
        for fraction in fractions:
            verdicts.append(judge(rows, primary, tolerance, series="trained", fraction=fraction))
        if any(r.series == "truncated" for r in rows):
            verdicts.append(judge(rows, primary, tolerance, series="truncated", fraction=max(fractions)))
    main = next((v for v in verdicts if v.series == "trained" and v.fraction == max(fractions)), None)
    summary = {"sweep_id": sweep_id, "primary_metric": primary, "tolerance": tolerance,
               "knee": main.verdict.knee if main else None,
               "separable": main.verdict.separable if main else False,
               "verdict": main.verdict.statement() if main else "no metric to judge",
               "lower_is_better": lower_is_better(primary) if primary else None,
               "data_fractions": fractions, **meta}
    if advice is not None:
        summary["advice"] = {k: v for k, v in advice.items() if k != "curve"}
    flat = [r.flat() for r in rows]
    columns = sorted({k for row in flat for k in row}, key=_column_order)
    with (directory / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    tables = {f: per_rank(rows, "trained", f) for f in fractions}
    truncated = per_rank(rows, "truncated")
    (directory / "results.json").write_text(json.dumps(
        {"summary": summary, "verdicts": [v.to_dict() for v in verdicts],
         "per_rank": tables[max(fractions)], "per_rank_by_fraction": {str(f): t for f, t in tables.items()},
         "per_rank_truncated": truncated, "points": flat, "advice": advice},
        indent=2, sort_keys=True, default=str), encoding="utf-8")
    metrics = [m for m in TABLE_COLUMNS if any(m in r for t in tables.values() for r in t)]
    plots.metric_vs_rank(verdicts, metrics, tables, truncated, directory / "metric_vs_rank.png")
    plots.params_vs_rank(tables[max(fractions)], directory / "params_vs_rank.png")
    if len(fractions) > 1 and primary:
        plots.rank_data_heatmap(tables, primary, directory / "rank_by_data.png")
    (directory / "results.md").write_text(markdown(summary, verdicts, tables, truncated, metrics, advice),
                                          encoding="utf-8")
    return summary


def _column_order(name: str) -> tuple[int, str]:
    first = ["series", "fraction", "rank", "seed", "adapter", "flags", "alpha", "scale", "over_complete",
             *TABLE_COLUMNS, *FACTS, "trainable_params", "adapter_mb", "wall_s", "tokens_per_s", "peak_mem_mb", "mode"]
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


def _spread_cell(verdict: SeriesVerdict, rank: int) -> list[str]:
    summary = next((s for s in verdict.ranks if s.rank == rank), None)
    if summary is None or summary.spread is None:
        return ["", "", ""]
    sp = summary.spread
    cis = ", ".join(f"s{s}: {summary.seed_values.get(s, float('nan')):.4g} [{i.low:.4g}, {i.high:.4g}]"
                    for s, i in summary.seed_intervals.items())
    interval = verdict.verdict.rank_interval.get(rank)
    mean = f"{sp.mean:.4g}" + ("" if sp.std is None else f" ± {sp.std:.2g}") + (
        f" ({sp.low:.4g}–{sp.high:.4g})" if sp.n > 1 else "")
    verdict_cell = "excluded" if rank in verdict.verdict.excluded else (
        "best" if rank == verdict.verdict.best else ("worse" if verdict.verdict.worse.get(rank) else "≈ best"))
    if interval is not None:
        verdict_cell += f" [{interval.low:.4g}, {interval.high:.4g}]"
    return [mean, cis, verdict_cell]


def _facts_line(summary: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("recipe", "progress", "mode", "alpha_policy", "seeds", "steps", "num_beams", "command"):
        if summary.get(key) is not None:
            lines.append(f"- {key}: `{summary[key]}`")
    return lines


def markdown(summary: dict[str, Any], verdicts: list[SeriesVerdict], tables: dict[float, list[dict[str, Any]]],
             truncated: list[dict[str, Any]], metrics: list[str], advice: dict[str, Any] | None = None) -> str:
    """``results.md``: per data fraction the per-rank table and its verdict; the truncated curve; the advice."""
    primary = summary.get("primary_metric") or ""
    others = [m for m in metrics if m != primary]
    head = ["r", "alpha", "seeds", f"{primary} mean ± std (min–max)", "per seed [95% CI over examples]",
            "vs best [95% CI]", *others, "steps", "epochs", "examples seen", "train rows", "data fraction",
            "trainable params", "adapter MB", "wall s", "flags", "over-complete"]
    lines = [f"# Rank sweep `{summary['sweep_id']}`", "", *_facts_line(summary), ""]
    for fraction, rows in sorted(tables.items(), reverse=True):
        verdict = next((v for v in verdicts if v.series == "trained" and v.fraction == fraction), None)
        if len(tables) > 1:
            lines += [f"## Data fraction {fraction:g}", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            spread = _spread_cell(verdict, row["rank"]) if verdict else ["", "", ""]
            seeds = ",".join(str(s) for s in row["seed_list"])
            cells = [row["rank"], row["alpha"], seeds, *spread, *[row.get(m) for m in others], row.get("steps"),
                     row.get("epochs"), row.get("examples_seen"), row.get("train_examples"), row.get("fraction"),
                     row.get("trainable_params"), row.get("adapter_mb"), row.get("wall_s"), row.get("flags"),
                     row.get("over_complete_modules") or ""]
            lines.append("| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in cells) + " |")
        lines.append("")
        if verdict is not None:
            lines.append(verdict.verdict.statement())
            lines.append("")
    lines += _notes(summary, tables)
    lines += _beam_lines(tables)
    trunc = next((v for v in verdicts if v.series == "truncated"), None)
    if truncated:
        lines += ["", "## SVD-truncated from the highest trained rank", "",
                  "| r | " + " | ".join(metrics) + " | vs untruncated best |", "|---|" + "---|" * (len(metrics) + 1)]
        for row in truncated:
            cell = _spread_cell(trunc, row["rank"])[2] if trunc else ""
            lines.append(f"| {row['rank']} | " + " | ".join(_fmt(row.get(m)) for m in metrics) + f" | {cell} |")
        if trunc is not None:
            lines += ["", trunc.verdict.statement()]
    if advice is not None:
        from adapterhub_local.sweep.advisor import advice_markdown

        lines += ["", *advice_markdown(advice)]
    lines += ["", "![metric vs rank](metric_vs_rank.png)", "", "![params vs rank](params_vs_rank.png)", ""]
    if len(tables) > 1:
        lines += ["![rank by data size](rank_by_data.png)", ""]
    return "\n".join(lines)


def _beam_lines(tables: dict[float, list[dict[str, Any]]]) -> list[str]:
    """Greedy against beam search, per metric, averaged over the ranks that have both."""
    rows = tables[max(tables)] if tables else []
    pairs = []
    for metric in ("bleu", "nist", "meteor", "rougeL", "cider"):
        both = [(r[metric], r[f"beam_{metric}"]) for r in rows
                if isinstance(r.get(metric), float) and isinstance(r.get(f"beam_{metric}"), float)]
        if both:
            greedy = sum(g for g, _ in both) / len(both)
            beam = sum(b for _, b in both) / len(both)
            pairs.append(f"{metric} {greedy:.4g} → {beam:.4g}")
    if not pairs:
        return []
    return ["", f"Greedy → beam search (mean over {len(rows)} rank(s), same test prompts): " + "; ".join(pairs) + "."]


def _notes(summary: dict[str, Any], tables: dict[float, list[dict[str, Any]]]) -> list[str]:
    lines = ["How to read this: the per-seed interval is a 95% percentile bootstrap over the evaluation examples; "
             "\"vs best\" is the rank's 95% interval with examples and seeds resampled, and \"worse\" means the "
             "paired bootstrap put the rank below another by more than the margin with bounds that hold for every "
             "pair of ranks at once (max-t, 95% one-sided), so comparing many ranks against a best picked on the "
             "same data does not inflate the chance of a false \"worse\". "
             f"Flags: below_baseline (not above the majority class / copy-the-input), collapsed (one answer for "
             f"every input), diverged (a non-finite loss, or the last training loss above {DIVERGED_FACTOR}× the "
             f"first), never_stops (under {MIN_STOPPED:.0%} of generations ended on EOS); flagged runs are "
             "left out of the knee."]
    if any(r.get("over_complete") for t in tables.values() for r in t):
        lines += ["", "Over-complete ranks (r > min(d_in, d_out) of a target module; the extra directions cannot "
                  "add rank to ΔW) were trained as asked and are marked in the last column."]
    return lines
