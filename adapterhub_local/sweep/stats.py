"""Noise in a sweep's verdict: bootstrap intervals over evaluation examples, spread over seeds, and the
paired test behind the knee.

Every run of a sweep is scored on the *same* held-out examples, so runs can be compared example by example.
A run's score is a function of column sums of its per-example matrix ``X [n, k]``: a mean (accuracy, ROUGE-L,
token F1: ``k = 1``), a loss per token (summed NLL and token count: ``k = 2``) or corpus BLEU (``k = 10``
sufficient statistics, ``metrics.bleu_from_stats``).
One bootstrap replicate draws example weights ``w ~ Multinomial(n, 1/n)`` (the same ``w`` for every run: the
comparison is *paired* over examples) and, per rank, its seeds with replacement (seeds are independent runs),
and scores every run on ``w @ X``.

The knee test (one-sided, paired bootstrap over examples and seeds, simultaneous over all pairs of ranks): for
every ordered pair of ranks ``(j, r)`` a lower confidence bound of ``d_jr = score_j − score_r`` (sign flipped for
lower-is-better metrics) is ``d̂_jr − c · sd_jr``, where ``sd_jr`` is the bootstrap standard deviation of the
difference and ``c`` the ``confidence`` quantile of the largest studentised deviation ``max_jr (d*_jr − d̂_jr) /
sd_jr`` over the replicates (a max-t bootstrap): the bounds hold for all pairs at once. Rank ``r`` is
*distinguishably worse* when some rank's bound above it exceeds the margin ``tolerance · |score_best|``. The knee
is the smallest rank that is not distinguishably worse; when no rank is, the data do not separate the ranks and no
knee is named ("not separable").

Why simultaneous: a sweep compares ten ranks or more against a best that is itself picked on the same noisy data.
Tested one by one at 95 % against that best, eleven ranks of equal accuracy were "separated" in about half of
synthetic sweeps (a false knee); the max-t bounds keep that at or below the nominal 5 %
(``benchmarks/knee_calibration.py``, ``tests/sweep/test_stats.py``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from adapterhub_local import metrics as task_metrics

Statistic = Callable[[np.ndarray, float], np.ndarray]
"""``(column sums [k] or [B, k], weight total n) → score``; vectorised over a leading replicate axis."""

CONFIDENCE = 0.95
RESAMPLES = 1000
# Per-example record key and statistic for each metric that can be bootstrapped.
MEAN_METRICS = {"accuracy": "correct", "val_accuracy": "val_correct", "rougeL": "rougeL", "token_f1": "token_f1",
                "meteor": "meteor", "cider": "cider"}


def mean_statistic(sums: np.ndarray, n: float) -> np.ndarray:
    """The mean of a one-column per-example score."""
    return sums[..., 0] / n


def bleu_statistic(sums: np.ndarray, n: float) -> np.ndarray:
    """Corpus BLEU from summed per-example BLEU statistics."""
    flat = sums.reshape(-1, sums.shape[-1])
    return np.array([task_metrics.bleu_from_stats([list(row)]) for row in flat]).reshape(sums.shape[:-1])


def ratio_statistic(sums: np.ndarray, n: float) -> np.ndarray:
    """Summed NLL over summed tokens: the mean loss per token of a (re)sample of examples."""
    return sums[..., 0] / np.maximum(sums[..., 1], 1.0)


def per_example_matrix(metric: str, per_example: dict[str, list]) -> tuple[np.ndarray, Statistic] | None:
    """The ``[n, k]`` per-example matrix of ``metric`` and its statistic, or None when the run kept none."""
    if metric == "bleu" and per_example.get("bleu_stats"):
        return np.asarray(per_example["bleu_stats"], dtype=np.float64), bleu_statistic
    for prefix in ("test_", "val_"):
        if metric == f"{prefix}loss" and per_example.get(f"{prefix}nll") and per_example.get(f"{prefix}tokens"):
            pairs = np.stack([np.asarray(per_example[f"{prefix}nll"], dtype=np.float64),
                              np.asarray(per_example[f"{prefix}tokens"], dtype=np.float64)], 1)
            return pairs, ratio_statistic
    key = MEAN_METRICS.get(metric)
    values = per_example.get(key) if key else None
    if values:
        return np.asarray(values, dtype=np.float64)[:, None], mean_statistic
    return None


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` multinomial example counts (each row sums to ``n``)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


@dataclass
class Interval:
    low: float
    high: float
    level: float = CONFIDENCE

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def percentile_interval(samples: np.ndarray, level: float = CONFIDENCE) -> Interval:
    tail = (1 - level) / 2
    return Interval(float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail)), level)


def bootstrap_ci(matrix: np.ndarray, statistic: Statistic, *, level: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of one run's score over its evaluation examples."""
    n = matrix.shape[0]
    weights = bootstrap_weights(n, resamples, seed)
    return percentile_interval(np.asarray(statistic(weights @ matrix, float(n))), level)


@dataclass
class SeedSpread:
    mean: float
    std: float | None
    """Sample standard deviation over seeds (None with one seed)."""
    low: float
    high: float
    n: int


def spread(values: Sequence[float]) -> SeedSpread:
    """Mean, std and min–max of one rank's scores over its seeds."""
    vals = [float(v) for v in values]
    return SeedSpread(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None,
                      min(vals), max(vals), len(vals))


@dataclass
class Verdict:
    """The outcome of the knee test over one set of ranks."""

    metric: str
    test: str
    confidence: float
    margin: float
    best: int | None = None
    knee: int | None = None
    separable: bool = False
    worse: dict[int, bool] = field(default_factory=dict)
    """Rank → distinguishably worse than some other rank (in practice, the best)."""
    deficit_low: dict[int, float] = field(default_factory=dict)
    """Rank → the largest simultaneous lower confidence bound of its deficit to another rank (in the metric's
    units, positive = worse); it is distinguishably worse when this exceeds the margin."""
    rank_interval: dict[int, Interval] = field(default_factory=dict)
    """Rank → bootstrap interval of its seed-mean score (examples and seeds resampled)."""
    excluded: dict[int, str] = field(default_factory=dict)
    reason: str = ""

    def statement(self) -> str:
        """One sentence for the report."""
        if not self.separable or self.knee is None:
            return f"**Knee: not separable** — {self.reason}"
        return (f"**Knee: r = {self.knee}** — the smallest rank whose {self.metric} is not distinguishably worse "
                f"than any other rank's (the best: r = {self.best}); {self.test}, {self.confidence:.0%} one-sided, "
                f"margin {self.margin:.4g}.")


def knee_test(runs: dict[int, list[np.ndarray]], statistic: Statistic, metric: str, *, lower_is_better: bool,
              tolerance: float = 0.0, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
              seed: int = 0) -> Verdict:
    """The knee over ``runs`` (rank → one ``[n, k]`` per-example matrix per seed; all on the same examples)."""
    test = "paired bootstrap over evaluation examples and seeds, simultaneous over all pairs of ranks (max-t)"
    verdict = Verdict(metric, test, confidence, 0.0)
    ranks = sorted(r for r, mats in runs.items() if mats)
    if not ranks:
        verdict.reason = "no rank with usable runs; a knee needs at least two"
        return verdict
    sizes = {m.shape[0] for r in ranks for m in runs[r]}
    if len(sizes) != 1:
        verdict.reason = f"runs were scored on different numbers of examples ({sorted(sizes)}); cannot pair them"
        return verdict
    n = sizes.pop()
    sign = -1.0 if lower_is_better else 1.0
    point = {r: statistics.fmean(float(statistic(m.sum(0), float(n))) for m in runs[r]) for r in ranks}
    best = max(ranks, key=lambda r: (sign * point[r], -r))
    weights = bootstrap_weights(n, resamples, seed)
    rng = np.random.default_rng(seed + 1)
    replicate: dict[int, np.ndarray] = {}
    for r in ranks:
        per_seed = np.stack([np.asarray(statistic(weights @ m, float(n))) for m in runs[r]])  # [seeds, B]
        picks = rng.integers(0, per_seed.shape[0], size=(per_seed.shape[0], resamples))  # seeds with replacement
        replicate[r] = np.take_along_axis(per_seed, picks, 0).mean(0)  # [B]
        verdict.rank_interval[r] = percentile_interval(replicate[r], confidence)
    if len(ranks) < 2:
        verdict.reason = "1 rank with usable runs; a knee needs at least two"
        return verdict
    margin = tolerance * abs(point[best])
    lower = simultaneous_lower_bounds(np.array([sign * point[r] for r in ranks]),
                                      np.stack([sign * replicate[r] for r in ranks]), confidence)
    for i, r in enumerate(ranks):
        low = float(np.delete(lower[:, i], i).max())
        verdict.deficit_low[r] = low
        verdict.worse[r] = low > margin
    verdict.best, verdict.margin = best, margin
    if not any(verdict.worse.values()):
        verdict.reason = (f"no rank's {metric} is distinguishably worse than the best's (r = {best}) — {test}, "
                          f"{confidence:.0%} one-sided, margin {margin:.4g}; more evaluation examples, seeds or "
                          "training steps are needed to tell these ranks apart")
        return verdict
    verdict.separable = True
    verdict.knee = min(r for r in ranks if not verdict.worse[r])
    return verdict


def simultaneous_lower_bounds(point: np.ndarray, replicates: np.ndarray, confidence: float) -> np.ndarray:
    """``[R, R]`` lower bounds of ``point[j] − point[i]`` (row ``j``, column ``i``) that hold for every pair at once
    with probability ``confidence``, from ``replicates`` ``[R, B]`` of the scores (higher is better): the max-t
    bootstrap of the module docstring. A pair whose difference never varies over the replicates (the same runs)
    gets its exact difference; the diagonal is ``-inf``."""
    diff = point[:, None] - point[None, :]  # [R, R]
    boot = replicates[:, None, :] - replicates[None, :, :]  # [R, R, B]
    sd = boot.std(axis=2)
    varies = (sd > 0) & ~np.eye(len(point), dtype=bool)
    if varies.any():
        scale = np.where(varies, sd, 1.0)[..., None]
        studentised = np.where(varies[..., None], (boot - diff[..., None]) / scale, -np.inf)
        critical = float(np.quantile(studentised.max(axis=(0, 1)), confidence))
    else:
        critical = 0.0
    lower = np.where(varies, diff - critical * sd, diff)
    np.fill_diagonal(lower, -np.inf)
    return lower


def finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
