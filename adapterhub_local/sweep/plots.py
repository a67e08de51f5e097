"""Matplotlib figures for sweeps and comparisons (headless, Agg backend): φ heatmaps per module, singular
value spectra, metric against rank on a log2 axis, trainable parameters against rank.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.sweep.analysis import Spectrum


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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
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


def metric_vs_rank(
    rows: list[dict[str, Any]], metrics: list[str], path: Path, knee: int | None = None,
    extra_series: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Each metric against rank (log2 x axis); the knee marked; optional extra series (e.g. truncated)."""
    plt = _pyplot()
    shown = [m for m in metrics if any(isinstance(r.get(m), int | float) for r in rows)]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(4.5 * max(len(shown), 1), 3.6), squeeze=False)
    for ax, metric in zip(axes.flat, shown, strict=False):
        series = {"trained": rows, **(extra_series or {})}
        for label, data in series.items():
            points = sorted((r["rank"], r[metric]) for r in data if isinstance(r.get(metric), int | float))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        over = [r for r in rows if r.get("over_complete") and isinstance(r.get(metric), int | float)]
        if over:
            ax.scatter([r["rank"] for r in over], [r[metric] for r in over], marker="x", color="red", zorder=3,
                       label="over-complete")
        if knee is not None:
            ax.axvline(knee, linestyle="--", color="grey", label=f"knee r={knee}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
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
