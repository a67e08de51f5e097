"""A published rank table set beside a sweep's: the same metrics per rank, side by side, and how the two curves'
shapes compare — where each peaks, how far apart its ranks are, and whether they order the ranks alike.

Absolute values of two different set-ups (model, tokenizer, decoding, data split) rarely compare; the shape does:
a paper's claim "performance peaks at r = 4 and stays flat" is about the curve, and the report tests ours against
it. A reference is a CSV file: ``#`` lines carry ``key: value`` facts (``title``, ``source``, ``setup`` …; shown
in the report), then a header whose first column is ``rank`` and whose other columns are metric names as the sweep
report spells them (``val_loss``, ``bleu``, ``nist``, ``meteor``, ``rougeL``, ``cider``, ``accuracy`` …), one row
per rank. Each metric is compared with each curve of the sweep that has it: the trained adapters decoded greedily,
with beam search (``beam_<metric>``), and the SVD truncations of the top rank (the advisor's predicted curve).

Spearman's ρ over the ranks both tables hold (ties averaged) measures whether the curves order ranks alike; with
eleven ranks a |ρ| below ~0.6 is within what two unrelated orderings give (two-sided 5 %: 0.62).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_local.errors import ConfigError, NotFoundError
from adapterhub_local.sweep.report_rows import lower_is_better

BEAM_PREFIX = "beam_"


@dataclass(frozen=True)
class ReferenceTable:
    """A published metric-per-rank table: facts from its ``#`` lines, and ``rows[rank][metric]``."""

    facts: dict[str, str]
    metrics: list[str]
    rows: dict[int, dict[str, float]]

    @property
    def title(self) -> str:
        return self.facts.get("title", "the reference table")


def load_reference(path: Path) -> ReferenceTable:
    """Read a reference table; every problem with it is listed in one error."""
    if not path.is_file():
        raise NotFoundError(f"reference table {path} does not exist",
                            "give a CSV file: '# key: value' lines, then a header 'rank,<metric>,…' and a row per rank")
    text = path.read_text(encoding="utf-8")
    facts: dict[str, str] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            key, sep, fact = line.lstrip()[1:].partition(":")
            if sep and key.strip() and " " not in key.strip():
                facts[key.strip()] = fact.strip()
        elif line.strip():
            body.append(line)
    problems: list[str] = []
    table = list(csv.reader(io.StringIO("\n".join(body))))
    if not table:
        raise ConfigError([f"{path} has no header and no rows"], "add a header 'rank,<metric>,…' and a row per rank",
                          what="reference table")
    header = [h.strip() for h in table[0]]
    if header[0] != "rank":
        problems.append(f"the first column is {header[0]!r}, not 'rank'")
    metrics = header[1:]
    if not metrics:
        problems.append("no metric columns after 'rank'")
    duplicated = sorted({m for m in metrics if metrics.count(m) > 1})
    problems += [f"column {m!r} appears twice" for m in duplicated]
    rows: dict[int, dict[str, float]] = {}
    for number, cells in enumerate(table[1:], start=2):
        if len(cells) != len(header):
            problems.append(f"row {number} has {len(cells)} cells, the header {len(header)}")
            continue
        rank_text = cells[0].strip()
        if not rank_text.isdigit() or int(rank_text) < 1:
            problems.append(f"row {number}: rank {rank_text!r} is not a positive integer")
            continue
        rank = int(rank_text)
        if rank in rows:
            problems.append(f"row {number}: rank {rank} appears twice")
            continue
        values: dict[str, float] = {}
        for metric, cell in zip(metrics, cells[1:], strict=True):
            if not cell.strip():
                continue  # a rank the source did not report for this metric
            try:
                value = float(cell)
            except ValueError:
                problems.append(f"row {number}: {metric} {cell.strip()!r} is not a number")
                continue
            if not math.isfinite(value):
                problems.append(f"row {number}: {metric} is {cell.strip()}")
                continue
            values[metric] = value
        rows[rank] = values
    if not rows and not problems:
        problems.append("no rows after the header")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems],
                          "fix the file: '# key: value' lines, then 'rank,<metric>,…' and one row per rank with "
                          "numbers (an empty cell for a value the source did not give)", what="reference table")
    return ReferenceTable(facts, metrics, rows)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); ``None`` with fewer than three pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def our_curves(per_rank: list[dict[str, Any]], per_rank_truncated: list[dict[str, Any]] | None,
               metric: str) -> dict[str, dict[int, tuple[float, float | None]]]:
    """The sweep's curves of ``metric``: ``label → {rank: (mean over seeds, std or None)}`` for the trained adapters
    decoded greedily and with beam search, and for the SVD truncations (the advisor's predicted curve)."""
    sources = [("greedy", per_rank, metric), ("beam", per_rank, BEAM_PREFIX + metric),
               ("truncated", per_rank_truncated or [], metric)]
    curves: dict[str, dict[int, tuple[float, float | None]]] = {}
    for label, rows, column in sources:
        curve = {}
        for row in rows:
            value, std = row.get(column), row.get(f"{column}_std")
            if isinstance(value, int | float) and math.isfinite(float(value)):
                curve[int(row["rank"])] = (float(value), float(std) if isinstance(std, int | float) else None)
        if curve:
            curves[label] = curve
    return curves


def compare(per_rank: list[dict[str, Any]], reference: ReferenceTable,
            per_rank_truncated: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per reference metric and curve of ours (:func:`our_curves`): best ranks, ranges across ranks, and Spearman's
    ρ over the ranks both hold. ``per_rank`` / ``per_rank_truncated``: the report's per-rank rows (seed means)."""
    found: list[dict[str, Any]] = []
    for metric in reference.metrics:
        theirs = {r: values[metric] for r, values in reference.rows.items() if metric in values}
        for label, curve in our_curves(per_rank, per_rank_truncated, metric).items():
            common = sorted(set(curve) & set(theirs))
            if not common:
                continue
            pick = min if lower_is_better(metric) else max
            ours_common, theirs_common = [curve[r][0] for r in common], [theirs[r] for r in common]
            found.append({
                "metric": metric, "curve": label, "ranks": common,
                "ours": {str(r): list(v) for r, v in sorted(curve.items())},
                "ours_best_rank": pick(common, key=lambda r: curve[r][0]),
                "reference_best_rank": pick(common, key=lambda r: theirs[r]),
                "ours_range": max(ours_common) - min(ours_common),
                "reference_range": max(theirs_common) - min(theirs_common),
                "spearman": spearman(ours_common, theirs_common),
            })
    if not found:
        ours_columns = sorted({k for row in per_rank for k in row if isinstance(row[k], int | float)})
        raise ConfigError([f"no metric of {reference.title} ({', '.join(reference.metrics)}) is a column of this "
                           f"sweep at a rank both hold (the sweep's columns: {', '.join(ours_columns)})"],
                          "name the reference's columns as the sweep report does (e.g. bleu, rougeL, val_loss)",
                          what="reference table")
    return found


def markdown(reference: ReferenceTable, comparison: list[dict[str, Any]]) -> str:
    """The side-by-side table (ours mean ± std over seeds, per curve) and the shape comparison, as markdown."""
    metrics_shown = list(dict.fromkeys(c["metric"] for c in comparison))
    lines = [f"# Beside {reference.title}", ""]
    lines += [f"- {key}: {value}" for key, value in reference.facts.items() if key != "title"]
    lines += ["", "Ours: mean over seeds (± std where there are several) of the trained adapters decoded greedily and "
              "with beam search, and of the SVD truncations of the top rank (the advisor's curve) where the sweep "
              "has them; the reference as published.", ""]
    head = ["r"]
    for metric in metrics_shown:
        head += [f"{metric} ({c['curve']})" for c in comparison if c["metric"] == metric] + [f"{metric} (ref.)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranks = sorted({int(r) for c in comparison for r in c["ours"]} | set(reference.rows))
    for rank in ranks:
        cells = [str(rank)]
        for metric in metrics_shown:
            cells += [_mean_std(c["ours"].get(str(rank))) for c in comparison if c["metric"] == metric]
            value = reference.rows.get(rank, {}).get(metric)
            cells.append("" if value is None else f"{value:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Shape: where each curve peaks, how far apart its ranks are (best − worst), and Spearman's ρ between "
              "the two orderings of the ranks both hold.", "",
              "| metric | our curve | our best r | ref. best r | our range | ref. range | Spearman ρ (ranks) |",
              "|---|---|---|---|---|---|---|"]
    for c in comparison:
        rho = "–" if c["spearman"] is None else f"{c['spearman']:+.2f}"
        lines.append(f"| {c['metric']} | {c['curve']} | {c['ours_best_rank']} | {c['reference_best_rank']} | "
                     f"{c['ours_range']:.4g} | {c['reference_range']:.4g} | {rho} ({len(c['ranks'])}) |")
    return "\n".join(lines) + "\n"


def _mean_std(point: list[float | None] | None) -> str:
    if point is None:
        return ""
    value, std = point
    assert value is not None
    spread = f" ± {std:.2g}" if std else ""
    return f"{value:.4g}{spread}"


def write_reference_report(report_dir: Path, reference: ReferenceTable) -> Path:
    """Set the reference beside the report in ``report_dir`` (its ``results.json``); writes ``reference.md``,
    ``reference.png`` (the curves, each on its own axis) and ``reference.json`` there; returns the markdown's path."""
    results = report_dir / "results.json"
    if not results.is_file():
        raise NotFoundError(f"{report_dir} holds no sweep report (results.json is missing)",
                            "give a sweep's report directory: runs/<sweep-id> or its interim/ report")
    report = json.loads(results.read_text(encoding="utf-8"))
    comparison = compare(report.get("per_rank") or [], reference, report.get("per_rank_truncated") or [])
    from adapterhub_local.sweep.plots import reference_curves

    out = report_dir / "reference.md"
    out.write_text(markdown(reference, comparison), encoding="utf-8")
    reference_curves(reference.rows, comparison, reference.title, report_dir / "reference.png")
    (report_dir / "reference.json").write_text(
        json.dumps({"reference": {"facts": reference.facts, "rows": reference.rows}, "comparison": comparison},
                   indent=2, sort_keys=True), encoding="utf-8")
    return out
