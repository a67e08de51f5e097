"""The rank advisor: train one high-rank adapter, predict the whole rank curve from its SVD truncations, and
recommend a rank with its expected cost and score.

* **Predicted curve** — every lower swept rank ``k`` is the best rank-``k`` approximation of the trained
  adapter's updates (``sweep/truncate.py``), evaluated like a trained run; the untruncated adapter is the
  curve's top point.
* **Recommendation** — the knee of that curve (:mod:`adapterhub_local.sweep.stats`: the smallest truncation not
  distinguishably worse than the best point). Where no truncation is distinguishably worse, the smallest swept
  rank is recommended and the advice says the evaluation could not separate them.
* **Spectrum** — the updates' effective ranks (entropy, 90% / 99% energy; mean over modules and seeds) give a
  second, evaluation-free estimate: the smallest swept rank at or above the mean 90%-energy rank.
* **Cost** — trainable parameters at rank ``k``: the high-rank run's, less its LoRA factors, plus ``k ·
  Σ (d_in + d_out)`` over its adapted modules; adapter size as measured on the truncation.
* **Check** — when trained adapters of the other ranks exist in the same sweep, the prediction is set beside
  them: per rank the predicted and trained score, the mean absolute error, and the trained sweep's knee.

Why truncation predicts training (and where it does not): a rank-``k`` adapter trained from scratch can find
directions the rank-``R`` one spread over many singular values, so the truncated curve is a *lower* estimate
at small ranks; the check against trained ranks measures by how much.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

from adapterhub_local.lora import lora_pairs
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.analysis import factored_svd, spectrum_of_values
from adapterhub_local.sweep.report_rows import PointResult, lower_is_better, per_rank
from adapterhub_local.sweep.verdict import SeriesVerdict, flag_rows, judge


def spectrum_summary(registry: Registry, refs: list[str]) -> dict[str, Any]:
    """Mean effective ranks of the adapters' updates over modules and adapters, and ``Σ (d_in + d_out)``."""
    entropy, e90, e99 = [], [], []
    per_rank_params = 0
    for ref in refs:
        loaded = registry.load_adapter(ref)
        pairs = lora_pairs(loaded.tensors, dict(loaded.config))
        per_rank_params = sum(p.a.shape[1] + p.b.shape[0] for p in pairs.values())
        for pair in pairs.values():
            _, s, _ = factored_svd(pair.a, pair.b, pair.scale)
            spec = spectrum_of_values(s)
            entropy.append(spec.entropy_rank)
            e90.append(spec.energy_rank_90)
            e99.append(spec.energy_rank_99)
    mean = statistics.fmean
    return {"entropy_rank": mean(entropy) if entropy else None, "energy_rank_90": mean(e90) if e90 else None,
            "energy_rank_99": mean(e99) if e99 else None, "lora_params_per_rank": per_rank_params}


def advise(registry: Registry, rows: list[PointResult], source_rank: int, metric: str, tolerance: float,
           fraction: float = 1.0) -> dict[str, Any] | None:
    """The advice (see the module docstring) from a sweep's rows; None when the high-rank run is missing."""
    sources = _sources(rows, source_rank, fraction)
    if not sources:
        return None
    spectrum = spectrum_summary(registry, [r.adapter for r in sources])
    return advice_from_rows(rows, spectrum, source_rank, metric, tolerance, fraction)


def reassess(advice: dict[str, Any], rows: list[PointResult], tolerance: float) -> dict[str, Any]:
    """``advice`` (as stored) judged again on the sweep's current rows — the recommendation, the curve and the
    check against trained ranks, which more trained points or a revised test change — keeping its spectrum (read
    from the adapters when it was made). Unchanged when its high-rank runs are no longer among the rows."""
    source_rank, fraction = int(advice["source_rank"]), float(advice.get("fraction", 1.0))
    if not _sources(rows, source_rank, fraction):
        return advice
    return advice_from_rows(rows, advice["spectrum"], source_rank, str(advice["metric"]), tolerance, fraction)


def _sources(rows: list[PointResult], source_rank: int, fraction: float) -> list[PointResult]:
    return [r for r in rows if r.series == "trained" and r.rank == source_rank and r.fraction == fraction]


def advice_from_rows(rows: list[PointResult], spectrum: dict[str, Any], source_rank: int, metric: str,
                     tolerance: float, fraction: float) -> dict[str, Any]:
    """The advice from the rows and the high-rank updates' ``spectrum`` (:func:`spectrum_summary`)."""
    sources = _sources(rows, source_rank, fraction)
    truncs = [r for r in rows if r.series == "truncated" and r.fraction == fraction]
    flag_rows(rows, metric)
    curve_rows = [*truncs, *[_as_truncated(r) for r in sources]]
    verdict = judge(curve_rows, metric, tolerance, series="truncated", fraction=fraction)
    curve = per_rank(curve_rows, "truncated", fraction)
    ranks = sorted(r["rank"] for r in curve)
    head = statistics.fmean(float(r.trainable_params or 0) for r in sources)
    lora_top = spectrum["lora_params_per_rank"] * source_rank

    def cost(rank: int) -> int:
        return round(head - lora_top + spectrum["lora_params_per_rank"] * rank)

    recommended, basis = recommend(verdict, sources, source_rank)
    at = next((r for r in curve if r["rank"] == recommended), {})
    e90 = spectrum["energy_rank_90"]
    spectral = next((r for r in ranks if e90 is not None and r >= e90), ranks[-1])
    advice: dict[str, Any] = {
        "source_rank": source_rank, "metric": metric, "fraction": fraction,
        "sources": [r.adapter for r in sources], "recommended_rank": recommended, "basis": basis,
        "separable": verdict.verdict.separable,
        "expected": {metric: at.get(metric), "val_loss": at.get("val_loss"), "test_loss": at.get("test_loss"),
                     "trainable_params": cost(recommended) if recommended else None,
                     "adapter_mb": at.get("adapter_mb")},
        "flags": {r["rank"]: r["flags"] for r in curve if r.get("flags")},
        "spectral_rank": spectral, "spectrum": spectrum,
        "curve": [{"rank": r["rank"], metric: r.get(metric), "val_loss": r.get("val_loss"),
                   "trainable_params": cost(r["rank"]), "adapter_mb": r.get("adapter_mb")} for r in curve],
    }
    advice["check"] = _check(rows, [r for r in curve if r["rank"] != source_rank], metric, tolerance, fraction,
                             recommended, verdict.verdict.separable)
    return advice


def recommend(curve: SeriesVerdict, sources: list[PointResult], source_rank: int) -> tuple[int | None, str]:
    """The recommended rank on the truncated curve (flags already set) and why; None where nothing can be said."""
    verdict = curve.verdict
    usable = sorted(r.rank for r in curve.ranks if r.rank not in verdict.excluded)
    if all(r.flags for r in sources):
        flags = sorted({f for r in sources for f in r.flags})
        return None, (f"no recommendation: the rank-{source_rank} adapter is flagged ({', '.join(flags)}), so its "
                      "truncations predict nothing; train it longer or with another learning rate")
    if verdict.separable and verdict.knee is not None:
        return verdict.knee, verdict.statement()
    if len(usable) < 2:
        return None, f"no recommendation: {verdict.reason}"
    return usable[0], (f"no truncation is distinguishably worse than the rank-{source_rank} adapter "
                       f"({verdict.reason}); the smallest usable rank is recommended, but the evaluation could "
                       "not separate the ranks")


def _as_truncated(row: PointResult) -> PointResult:
    out = copy.copy(row)
    out.series = "truncated"
    return out


def _check(rows: list[PointResult], curve: list[dict[str, Any]], metric: str, tolerance: float, fraction: float,
           recommended: int | None, separable: bool) -> dict[str, Any] | None:
    trained = per_rank(rows, "trained", fraction)
    predicted = {r["rank"]: r.get(metric) for r in curve}
    pairs: list[tuple[int, float, float]] = []
    for row in trained:
        guess, value = predicted.get(row["rank"]), row.get(metric)
        if isinstance(guess, float) and isinstance(value, float):
            pairs.append((int(row["rank"]), guess, value))
    if not pairs:  # the trained high-rank adapter is its own prediction; it is left out of the check
        return None
    verdict = judge(rows, metric, tolerance, series="trained", fraction=fraction)
    errors = [abs(p - t) for _, p, t in pairs]
    sign = -1 if lower_is_better(metric) else 1
    return {"per_rank": [{"rank": r, "predicted": p, "trained": t} for r, p, t in pairs],
            "mean_abs_error": statistics.fmean(errors),
            "mean_signed_error": statistics.fmean(sign * (p - t) for _, p, t in pairs),
            "trained_knee": verdict.verdict.knee, "trained_separable": verdict.verdict.separable,
            "trained_statement": verdict.verdict.statement(),
            "agrees": advice_agrees(recommended, separable, verdict.verdict.knee, verdict.verdict.separable)}


def advice_agrees(recommended: int | None, separable: bool, trained_knee: int | None,
                  trained_separable: bool) -> bool | None:
    """Whether the advice and the trained sweep say the same: the same knee, or both that the evaluation cannot
    separate the ranks; None when the advisor made no recommendation."""
    if recommended is None:
        return None
    if separable and trained_separable:
        return trained_knee == recommended
    return separable == trained_separable


def advice_markdown(advice: dict[str, Any]) -> list[str]:
    """The advice as a report section."""
    metric = advice["metric"]
    spec = advice["spectrum"]
    lines = ["## Rank advisor", "",
             f"Trained r = {advice['source_rank']} ({', '.join(advice['sources'])}); every lower rank predicted "
             "by SVD truncation of its updates.", "",
             _headline(advice), "",
             f"Spectrum of the r = {advice['source_rank']} updates (mean over modules): entropy effective rank "
             f"{_num(spec.get('entropy_rank'))}, 90% energy at {_num(spec.get('energy_rank_90'))}, 99% at "
             f"{_num(spec.get('energy_rank_99'))} → spectral estimate r = {advice['spectral_rank']}.", "",
             f"| r | predicted {metric} | predicted val_loss | trainable params | flags |", "|---|---|---|---|---|"]
    flags = {str(k): v for k, v in advice.get("flags", {}).items()}
    for row in advice["curve"]:
        lines.append(f"| {row['rank']} | {_num(row.get(metric))} | {_num(row.get('val_loss'))} | "
                     f"{_num(row.get('trainable_params'))} | {flags.get(str(row['rank']), '')} |")
    check = advice.get("check")
    if check:
        lines += ["", "Prediction against trained ranks:", "", f"| r | predicted {metric} | trained {metric} |",
                  "|---|---|---|"]
        lines += [f"| {c['rank']} | {_num(c['predicted'])} | {_num(c['trained'])} |" for c in check["per_rank"]]
        agrees = {True: "agrees with", False: "differs from", None: "cannot be checked against"}[check["agrees"]]
        both_inseparable = check["agrees"] and not check["trained_separable"]
        why = " (neither the truncations nor the trained ranks can be told apart)" if both_inseparable else ""
        lines += ["", f"Mean absolute error {_num(check['mean_abs_error'])} (signed, positive = prediction better "
                  f"than training: {_num(check['mean_signed_error'])}). The recommendation {agrees} the trained "
                  f"sweep's verdict{why}: {check['trained_statement']}"]
    else:
        lines += ["", "No trained adapters of the other ranks yet: run the same sweep without --advise to check "
                  "the prediction."]
    return lines


def _headline(advice: dict[str, Any]) -> str:
    metric, expected = advice["metric"], advice["expected"]
    if advice["recommended_rank"] is None:
        return f"**No recommended rank** — {advice['basis']}"
    return (f"**Recommended rank: r = {advice['recommended_rank']}** — expected {metric} "
            f"{_num(expected.get(metric))}, val_loss {_num(expected.get('val_loss'))}, "
            f"{_num(expected.get('trainable_params'))} trainable parameters, adapter "
            f"{_num(expected.get('adapter_mb'))} MB. Basis: {advice['basis']}")


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
