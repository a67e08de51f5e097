"""Sanity flags: diverged losses, generations below the copy-the-input baseline or that never stop, collapsed
generators (the classifier flags are exercised through the report in test_report.py)."""

from __future__ import annotations

from typing import Any

from adapterhub_local.sweep.sanity import flags_of, majority_share


def test_majority_share_is_the_accuracy_of_the_most_frequent_label() -> None:
    assert majority_share([0, 0, 1, 0]) == 0.75 and majority_share([1, 2]) == 0.5


def test_a_diverged_run_is_flagged() -> None:
    ok = {"first_train_loss": 2.0, "last_train_loss": 1.2, "nonfinite_train_loss": False}
    assert flags_of({"val_loss": 1.0}, {}, ok, "val_loss") == []
    assert flags_of({}, {}, {**ok, "last_train_loss": 3.5}, None) == ["diverged"]
    assert flags_of({}, {}, {**ok, "nonfinite_train_loss": True}, None) == ["diverged"]


def test_generations_below_copy_baseline_or_never_stopping_are_flagged() -> None:
    record: dict[str, list[Any]] = {"hypothesis": ["a", "b", "c"], "stopped": [0, 0, 1]}
    assert flags_of({"bleu": 3.0, "baseline_bleu": 5.0}, record, {}, "bleu") == ["below_baseline", "never_stops"]
    assert flags_of({"bleu": 30.0, "baseline_bleu": 5.0}, {**record, "stopped": [1, 1, 0]}, {}, "bleu") == []
    assert flags_of({"bleu": 30.0}, {"hypothesis": ["same"] * 3, "stopped": [1] * 3}, {}, "bleu") == ["collapsed"]
