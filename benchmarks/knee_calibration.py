"""How often the sweep's knee test names a knee that is not there, and how often it finds one that is: the
simultaneous (max-t) test of ``sweep/stats.py`` against the test it replaced, which compared each rank with the
best one pair at a time, on the same synthetic sweeps in one run.

A synthetic sweep: ``--ranks`` ranks, each a classifier whose per-example correctness on ``--examples`` shared
test examples is drawn at its true accuracy (``--seeds`` independent runs per rank; a share ``--shared`` of the
examples is decided the same way for every run, as when every rank finds the same examples easy or hard).

* **False knee rate** — every rank at the same accuracy (0.8): a named knee is wrong; nominal 5 % or less.
* **Power** — rank 1 ``--gap`` below the others: the share of sweeps that call it worse and put the knee at r = 2.

Both tests use the same bootstrap replicates of each sweep (paired over examples, seeds resampled), the margin
``--tolerance`` × the best score and 95 % one-sided confidence.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/knee_calibration.py            # ~2 minutes on one core

Writes ``benchmarks/results/knee_calibration.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapterhub_local.sweep import stats

CONFIDENCE = 0.95


def _sweep(rng: np.random.Generator, accuracies: list[float], examples: int, seeds: int,
           shared: float) -> dict[int, list[np.ndarray]]:
    common = rng.random(examples)
    runs: dict[int, list[np.ndarray]] = {}
    for k, accuracy in enumerate(accuracies):
        mats = []
        for _ in range(seeds):
            own = rng.random(examples)
            draw = np.where(rng.random(examples) < shared, common, own)
            mats.append((draw < accuracy).astype(np.float64)[:, None])
        runs[2**k] = mats
    return runs


def _one_pair_at_a_time(runs: dict[int, list[np.ndarray]], tolerance: float, resamples: int,
                        seed: int) -> int | None:
    """The replaced test: rank ``r`` is worse when the 5 % quantile of its bootstrap deficit to the best exceeds
    the margin; the knee is the smallest rank that is not worse, None when none is."""
    ranks = sorted(runs)
    n = runs[ranks[0]][0].shape[0]
    point = {r: float(np.mean([m.mean() for m in runs[r]])) for r in ranks}
    best = max(ranks, key=lambda r: (point[r], -r))
    replicate = _replicates(runs, resamples, seed, n)
    margin = tolerance * abs(point[best])
    worse = {r: r != best and float(np.quantile(replicate[best] - replicate[r], 1 - CONFIDENCE)) > margin
             for r in ranks}
    return min(r for r in ranks if not worse[r]) if any(worse.values()) else None


def _replicates(runs: dict[int, list[np.ndarray]], resamples: int, seed: int, n: int) -> dict[int, np.ndarray]:
    """The seed-mean score of each rank in every replicate, drawn as ``stats.knee_test`` draws them."""
    weights = stats.bootstrap_weights(n, resamples, seed)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for r in sorted(runs):
        per_seed = np.stack([(weights @ m)[:, 0] / n for m in runs[r]])
        picks = rng.integers(0, per_seed.shape[0], size=(per_seed.shape[0], resamples))
        out[r] = np.take_along_axis(per_seed, picks, 0).mean(0)
    return out


def _rates(args: argparse.Namespace, accuracies: list[float], expected_knee: int | None) -> dict[str, float]:
    rng = np.random.default_rng(args.seed)
    hits = {"simultaneous": 0, "one_pair_at_a_time": 0}
    for i in range(args.sweeps):
        runs = _sweep(rng, accuracies, args.examples, args.seeds, args.shared)
        verdict = stats.knee_test(runs, stats.mean_statistic, "accuracy", lower_is_better=False,
                                  tolerance=args.tolerance, resamples=args.resamples, seed=i)
        old = _one_pair_at_a_time(runs, args.tolerance, args.resamples, i)
        if expected_knee is None:  # any knee is false
            hits["simultaneous"] += verdict.knee is not None
            hits["one_pair_at_a_time"] += old is not None
        else:
            hits["simultaneous"] += verdict.knee == expected_knee
            hits["one_pair_at_a_time"] += old == expected_knee
    return {k: v / args.sweeps for k, v in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 5, 11])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--shared", type=float, default=0.5)
    parser.add_argument("--tolerance", type=float, nargs="+", default=[0.01, 0.0])
    parser.add_argument("--gap", type=float, nargs="+", default=[0.05, 0.08])
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    tolerances, gaps = args.tolerance, args.gap
    for n_ranks in args.ranks:
        for tolerance in tolerances:
            args.tolerance = tolerance
            rates = _rates(args, [0.8] * n_ranks, None)
            rows.append({"ranks": n_ranks, "tolerance": tolerance, "case": "all ranks equal: false knee", **rates})
            for gap in gaps:
                rates = _rates(args, [0.8 - gap] + [0.8] * (n_ranks - 1), 2)
                rows.append({"ranks": n_ranks, "tolerance": tolerance, "case": f"r = 1 {gap:g} below: knee r = 2",
                             **rates})
    args.tolerance, args.gap = tolerances, gaps
    meta = {"command": " ".join(sys.argv), "examples": args.examples, "seeds": args.seeds, "shared": args.shared,
            "sweeps": args.sweeps, "resamples": args.resamples, "confidence": CONFIDENCE,
            "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "knee_calibration.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n",
                                                    encoding="utf-8")
    lines = [f"# Knee test calibration ({meta['date']})", "",
             f"`{meta['command']}` — {args.sweeps} synthetic sweeps per row, {args.examples} test examples, "
             f"{args.seeds} seed(s) per rank, {args.shared:.0%} of the examples decided alike for every run, "
             f"{args.resamples} bootstrap replicates, 95 % one-sided; {meta['seconds']} s.", "",
             "| ranks | margin | case | simultaneous (max-t) | one pair at a time (replaced) |",
             "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['ranks']} | {r['tolerance']:.0%} of best | {r['case']} | {r['simultaneous']:.1%} | "
              f"{r['one_pair_at_a_time']:.1%} |" for r in rows]
    (args.out / "knee_calibration.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
