"""Matplotlib figures for sweeps and comparisons (headless, Agg backend): φ heatmaps per module, singular
value spectra, metric against rank on a log2 axis with error bars, trainable parameters against rank, and the
rank × data-size heatmap, a sweep beside a published rank table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapterhub_local.sweep.analysis import Spectrum

if TYPE_CHECKING:
    from adapterhub_local.sweep.amplification import Amplification
    from adapterhub_local.sweep.verdict import SeriesVerdict


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def pick_modules(modules: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` modules spread evenly over the depth — first and last always included."""
    ordered = sorted(modules, key=natural_key)
    if len(ordered) <= limit:
        return ordered
    if limit <= 1:
        return ordered[:1]
    step = (len(ordered) - 1) / (limit - 1)
    return [ordered[round(i * step)] for i in range(limit)]


def similarity_heatmaps(grids: dict[str, torch.Tensor], a: str, b: str, path: Path, max_modules: int = 6) -> Path:
    """One heatmap of φ(i, j) per module (i = directions of ``a``, j = of ``b``), as in the LoRA paper's Fig. 3."""
    plt = _pyplot()
    chosen = pick_modules(list(grids), max_modules)
    cols = min(3, max(len(chosen), 1))
    rows = max(1, -(-len(chosen) // cols))
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, module in zip(axes.flat, chosen, strict=False):
        grid = grids[module].numpy()
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper", aspect="auto",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5), interpolation="nearest")
        ax.set_title(module, fontsize=7)
        for axis, size in ((ax.yaxis, grid.shape[0]), (ax.xaxis, grid.shape[1])):
            if size <= 10:  # every direction ticked (a locator falls back to fractions below two integers)
                axis.set_ticks(range(1, size + 1))
            else:
                axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"j ({b})", fontsize=7)
        ax.set_ylabel(f"i ({a})", fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"normalised subspace similarity: {a} vs {b}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectra_plot(spectra: dict[str, dict[str, Spectrum]], path: Path) -> Path:
    """Per adapter, the singular values of ΔW normalised by the largest, averaged over modules (log-log)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for ref, modules in spectra.items():
        curves = [torch.tensor(s.singular_values[: s.numerical_rank]) for s in modules.values() if s.numerical_rank]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = torch.stack([c[:length] / c[0] for c in curves]).mean(0)
        ax.plot(range(1, length + 1), mean.numpy(), marker=".", label=ref)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_i / σ_1 (mean over modules)")
    ax.set_title("spectrum of ΔW")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def amplification_plot(rows: dict[str, list[Amplification]], path: Path) -> Path:
    """Per kind of module, each adapter's amplification factor ‖ΔW‖_F / ‖U_kᵀ W V_k‖_F against depth (the
    modules' order in the adapter), log scale."""
    plt = _pyplot()
    kinds = sorted({row.module.rsplit(".", 1)[-1] for members in rows.values() for row in members})
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(5 * max(len(kinds), 1), 3.6), squeeze=False)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        for ref, members in rows.items():
            mine = sorted((r for r in members if r.module.rsplit(".", 1)[-1] == kind and math.isfinite(r.factor)),
                          key=lambda r: natural_key(r.module))  # layers.2 before layers.10
            if mine:
                ax.plot(range(len(mine)), [r.factor for r in mine], marker=".", label=f"{ref} (k={mine[0].k})")
        ax.set_yscale("log")
        ax.set_xlabel(f"{kind}, by depth")
        ax.set_ylabel("‖ΔW‖ / ‖U_kᵀ W V_k‖")
        ax.set_title(f"amplification of W's directions: {kind}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_vs_rank(verdicts: Sequence[SeriesVerdict], metrics: list[str], tables: dict[float, list[dict[str, Any]]],
                   truncated: list[dict[str, Any]], path: Path) -> Path:
    """Each metric against rank (log2 x axis), one line per data fraction (and the truncated curve). The judged
    metric carries error bars — the rank's 95% bootstrap interval over examples and seeds — with every seed's
    score as a dot, flagged runs as red crosses and the knee as a dashed line; other metrics show ± the seed std."""
    plt = _pyplot()
    shown = [m for m in metrics if any(isinstance(r.get(m), int | float) for t in tables.values() for r in t)]
    cols = min(4, max(len(shown), 1))
    rows_n = -(-max(len(shown), 1) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.6 * rows_n), squeeze=False)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    judged = {(v.series, v.fraction): v for v in verdicts}
    series: list[tuple[str, float, list[dict[str, Any]]]] = [("trained", f, t) for f, t in sorted(tables.items())]
    if truncated:
        series.append(("truncated", max(tables) if tables else 1.0, truncated))
    for ax, metric in zip(axes.flat, shown, strict=False):
        for name, fraction, rows in series:
            label = name if len(tables) == 1 else f"{name}, data {fraction:g}"
            points = sorted((r["rank"], r[metric]) for r in rows if isinstance(r.get(metric), int | float))
            if not points:
                continue
            x = [p[0] for p in points]
            y = [p[1] for p in points]
            verdict = judged.get((name, fraction))
            if verdict is not None and verdict.metric == metric:
                low = [y_i - verdict.verdict.rank_interval[r].low if r in verdict.verdict.rank_interval else 0.0
                       for r, y_i in points]
                high = [verdict.verdict.rank_interval[r].high - y_i if r in verdict.verdict.rank_interval else 0.0
                        for r, y_i in points]
                line = ax.errorbar(x, y, yerr=[[max(v, 0.0) for v in low], [max(v, 0.0) for v in high]],
                                   marker="o", capsize=3, label=label)
                for summary in verdict.ranks:
                    for seed, value in summary.seed_values.items():
                        flagged = seed in summary.flags
                        ax.scatter([summary.rank], [value], s=14, zorder=3,
                                   color="red" if flagged else line[0].get_color(),
                                   marker="x" if flagged else ".", alpha=0.8)
                if verdict.verdict.knee is not None and name == "trained":
                    where = "" if len(tables) == 1 else f" ({fraction:g})"
                    ax.axvline(verdict.verdict.knee, linestyle="--", color=line[0].get_color(),
                               label=f"knee r={verdict.verdict.knee}{where}")
            else:
                std = {r["rank"]: float(r.get(f"{metric}_std") or 0.0) for r in rows}
                ax.errorbar(x, y, yerr=[std[r] for r in x], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rank_data_heatmap(tables: dict[float, list[dict[str, Any]]], metric: str, path: Path) -> Path:
    """The mean ``metric`` over seeds for every (data fraction, rank): rank × data size at a glance."""
    plt = _pyplot()
    fractions = sorted(tables)
    ranks = sorted({r["rank"] for t in tables.values() for r in t})
    grid = torch.full((len(fractions), len(ranks)), float("nan"))
    for i, fraction in enumerate(fractions):
        for row in tables[fraction]:
            if isinstance(row.get(metric), int | float):
                grid[i, ranks.index(row["rank"])] = float(row[metric])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 + 0.6 * len(ranks)), max(3.0, 1.6 + 0.6 * len(fractions))))
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", origin="lower")
    for i in range(len(fractions)):
        for j in range(len(ranks)):
            if not torch.isnan(grid[i, j]):
                ax.text(j, i, f"{float(grid[i, j]):.3g}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_yticks(range(len(fractions)), [f"{f:g}" for f in fractions])
    ax.set_xlabel("rank r")
    ax.set_ylabel("fraction of training data")
    fig.colorbar(image, ax=ax, label=f"{metric} (mean over seeds)")
    ax.set_title(f"{metric}: rank × data size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def params_vs_rank(rows: list[dict[str, Any]], path: Path) -> Path:
    """Trainable parameters and adapter size against rank (log2 x, log y)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    points = sorted((r["rank"], r["trainable_params"]) for r in rows if r.get("trainable_params"))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title("cost of rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reference_curves(reference_rows: dict[int, dict[str, float]], comparison: list[dict[str, Any]], title: str,
                     path: Path) -> Path:
    """One panel per metric: the sweep's curves (``comparison[i]["ours"]``: trained greedy solid with ± std bars,
    beam dashed, truncations dotted) on the left axis and a published table's on the right axis (its own scale:
    set-ups differ, shapes compare), ranks on a log2 axis."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(c["metric"] for c in comparison))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False, layout="constrained")
    styles = {"greedy": ("-o", "C0"), "beam": ("--s", "C1"), "truncated": (":x", "C2")}  # the same in every panel
    for ax, metric in zip(axes.flat, metrics, strict=False):
        rhos = []
        for c in (c for c in comparison if c["metric"] == metric):
            ranks = sorted(int(r) for r in c["ours"])
            values = [c["ours"][str(r)][0] for r in ranks]
            errors = [c["ours"][str(r)][1] or 0.0 for r in ranks]
            fmt, color = styles.get(c["curve"], ("-", "C3"))
            ax.errorbar(ranks, values, yerr=errors, fmt=fmt, color=color, ms=3, capsize=2, label=f"ours ({c['curve']})")
            if c["spearman"] is not None:
                rhos.append(f"{c['curve']} ρ={c['spearman']:+.2f}")
        theirs = sorted(r for r, v in reference_rows.items() if metric in v)
        twin = ax.twinx()
        twin.plot(theirs, [reference_rows[r][metric] for r in theirs], ":^", color="black", ms=3, label="reference")
        twin.tick_params(labelsize=7)
        ax.set_xscale("log", base=2)
        ax.set_title(metric + (f"\n{', '.join(rhos)}" if rhos else ""), fontsize=8)
        ax.set_xlabel("rank r", fontsize=8)
        ax.tick_params(labelsize=7)
        handles, labels = ax.get_legend_handles_labels()
        twin_handles, twin_labels = twin.get_legend_handles_labels()
        ax.legend(handles + twin_handles, labels + twin_labels, fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"Ours (left axis) beside {title} (right axis)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
