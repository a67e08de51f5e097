"""The noise-aware verdict: bootstrap intervals cover the truth at their nominal rate, the knee test withholds a
knee when ranks come from one distribution and names it when one rank is clearly better."""

from __future__ import annotations

import numpy as np
import pytest

from adapterhub_local import metrics
from adapterhub_local.sweep import stats


def _classifier(rng: np.random.Generator, accuracy: float, n: int) -> np.ndarray:
    """Per-example correctness of a synthetic classifier with true accuracy ``accuracy``: ``[n, 1]``."""
    return (rng.random(n) < accuracy).astype(np.float64)[:, None]


def test_bootstrap_interval_covers_the_true_accuracy_at_its_nominal_rate() -> None:
    rng = np.random.default_rng(0)
    true, repeats = 0.7, 300
    hits = 0
    for i in range(repeats):
        run = _classifier(rng, true, 200)
        interval = stats.bootstrap_ci(run, stats.mean_statistic, resamples=400, seed=i)
        hits += interval.contains(true)
    # 95% nominal; the percentile bootstrap of a proportion at n = 200 sits close to it. Binomial sd over 300
    # repeats is about 1.3 points, so [0.90, 0.99] is a wide but meaningful band.
    assert 0.90 <= hits / repeats <= 0.99


def test_interval_narrows_with_more_examples() -> None:
    rng = np.random.default_rng(1)
    small = stats.bootstrap_ci(_classifier(rng, 0.6, 50), stats.mean_statistic)
    large = stats.bootstrap_ci(_classifier(rng, 0.6, 2000), stats.mean_statistic)
    assert large.high - large.low < (small.high - small.low) / 3


@pytest.mark.parametrize(("seeds", "ranks", "tolerance"), [(1, 4, 0.01), (3, 4, 0.01), (1, 11, 0.01), (1, 11, 0.0),
                                                          (2, 11, 0.0)])
def test_knee_is_withheld_when_ranks_share_one_distribution(seeds: int, ranks: int, tolerance: float) -> None:
    # Different seeds of the same classifier quality at every rank: any "knee" would be noise. Eleven ranks make
    # ten comparisons against a best picked on the same data; tested one by one at 95 % they named a knee in
    # about half of such sweeps (nearly all without a margin; benchmarks/knee_calibration.py), which the
    # simultaneous bounds must bring to about 5 % or less.
    rng = np.random.default_rng(2)
    separable = 0
    repeats = 60
    for i in range(repeats):
        runs = {2**k: [_classifier(rng, 0.75, 300) for _ in range(seeds)] for k in range(ranks)}
        verdict = stats.knee_test(runs, stats.mean_statistic, "accuracy", lower_is_better=False, resamples=400,
                                  seed=i, tolerance=tolerance)
        separable += verdict.separable
        if not verdict.separable:
            assert verdict.knee is None and "not separable" in verdict.statement()
    # 95 % simultaneous: about 3 false knees in 60 expected; 9 or more has probability < 1 % at the nominal rate.
    assert separable <= 8, f"{separable} of {repeats} sweeps of identical ranks named a knee"


def test_simultaneous_bounds_cover_every_true_difference_at_once() -> None:
    """The family of lower bounds holds as a whole at its nominal rate: over repeated sweeps with known accuracies,
    the share in which *some* bound exceeds its true difference stays near 5 %."""
    rng = np.random.default_rng(7)
    truth = np.array([0.70, 0.72, 0.75, 0.75, 0.78, 0.80])
    misses, repeats, n = 0, 80, 400
    for i in range(repeats):
        runs = [_classifier(rng, float(a), n) for a in truth]
        weights = stats.bootstrap_weights(n, 400, seed=i)
        point = np.array([float(r.mean()) for r in runs])
        replicates = np.stack([(weights @ r)[:, 0] / n for r in runs])
        lower = stats.simultaneous_lower_bounds(point, replicates, 0.95)
        true_diff = truth[:, None] - truth[None, :]
        off = ~np.eye(len(truth), dtype=bool)
        misses += bool((lower[off] > true_diff[off]).any())
        assert np.isneginf(np.diag(lower)).all()
    assert misses / repeats <= 0.125  # nominal 5 %; binomial sd over 80 repeats is 2.4 points


def test_identical_runs_are_never_separated() -> None:
    run = _classifier(np.random.default_rng(3), 0.8, 400)
    verdict = stats.knee_test({1: [run, run], 4: [run, run]}, stats.mean_statistic, "accuracy",
                              lower_is_better=False)
    assert not verdict.separable and verdict.knee is None


def test_knee_is_named_when_one_rank_is_clearly_better() -> None:
    rng = np.random.default_rng(4)
    runs = {1: [_classifier(rng, 0.55, 400) for _ in range(2)],
            2: [_classifier(rng, 0.60, 400) for _ in range(2)],
            4: [_classifier(rng, 0.90, 400) for _ in range(2)],
            8: [_classifier(rng, 0.90, 400) for _ in range(2)]}
    verdict = stats.knee_test(runs, stats.mean_statistic, "accuracy", lower_is_better=False)
    assert verdict.separable and verdict.knee == 4
    assert verdict.worse[1] and verdict.worse[2] and not verdict.worse[8]
    assert "Knee: r = 4" in verdict.statement() and "paired bootstrap" in verdict.statement()


def test_lower_is_better_metrics_are_judged_the_other_way() -> None:
    rng = np.random.default_rng(5)
    loss = {1: [rng.normal(3.0, 0.3, (300, 1))], 2: [rng.normal(2.0, 0.3, (300, 1))]}
    verdict = stats.knee_test(loss, stats.mean_statistic, "test_loss", lower_is_better=True)
    assert verdict.best == 2 and verdict.knee == 2 and verdict.worse[1]


def test_margin_absorbs_differences_below_the_tolerance() -> None:
    rng = np.random.default_rng(6)
    runs = {1: [_classifier(rng, 0.86, 3000)], 2: [_classifier(rng, 0.90, 3000)]}
    strict = stats.knee_test(runs, stats.mean_statistic, "accuracy", lower_is_better=False, tolerance=0.0)
    loose = stats.knee_test(runs, stats.mean_statistic, "accuracy", lower_is_better=False, tolerance=0.2)
    assert strict.knee == 2 and not loose.separable


def test_bleu_statistic_rebuilds_corpus_bleu_from_per_example_statistics() -> None:
    hyps = ["the pub is cheap", "a family restaurant near the river", "it serves french food", "x y z"]
    refs = [["the pub is cheap and near"], ["a family friendly restaurant near the river", "near the river"],
            ["it serves french food"], ["something else"]]
    found = stats.per_example_matrix("bleu", {"bleu_stats": metrics.bleu_stats(hyps, refs)})
    assert found is not None
    matrix, statistic = found
    assert float(statistic(matrix.sum(0), float(len(hyps)))) == pytest.approx(metrics.bleu(hyps, refs))
    interval = stats.bootstrap_ci(matrix, statistic, resamples=200)
    assert 0.0 <= interval.low <= interval.high <= 100.0


def test_runs_on_different_examples_are_not_compared() -> None:
    verdict = stats.knee_test({1: [np.ones((10, 1))], 2: [np.ones((12, 1))]}, stats.mean_statistic, "accuracy",
                              lower_is_better=False)
    assert not verdict.separable and "different numbers of examples" in verdict.reason


def test_seed_spread_reports_std_and_range() -> None:
    spread = stats.spread([0.625, 0.5625])
    assert spread.mean == pytest.approx(0.59375) and spread.low == 0.5625 and spread.high == 0.625
    assert spread.std == pytest.approx(0.0441941738)
    assert stats.spread([0.5]).std is None


def test_loss_per_token_is_rebuilt_from_per_example_sums() -> None:
    record: dict[str, list[float]] = {"test_nll": [2.0, 9.0, 1.0], "test_tokens": [1, 3, 1]}
    found = stats.per_example_matrix("test_loss", record)
    assert found is not None
    matrix, statistic = found
    assert float(statistic(matrix.sum(0), 3.0)) == pytest.approx(12.0 / 5)
    assert stats.per_example_matrix("val_loss", record) is None
