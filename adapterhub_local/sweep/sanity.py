"""Sanity flags on a sweep's runs: results no verdict should rest on. A flagged run is marked in the table and
left out of the knee test.

* ``below_baseline`` — classification: accuracy not above the majority class's share of the test labels (what
  always answering the most frequent test label scores; a collapsed classifier lands exactly there);
  generation: the primary metric not above the copy-the-input baseline (each prompt returned as its output).
* ``collapsed`` — one answer for every input (a single predicted class; identical generations).
* ``diverged`` — a non-finite training or validation loss, or a last logged training loss above
  ``DIVERGED_FACTOR ×`` the first one.
* ``never_stops`` — fewer than ``MIN_STOPPED`` of the generations ended on EOS (the rest ran to
  ``max_new_tokens``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

DIVERGED_FACTOR = 1.5
MIN_STOPPED = 0.5
FLAGS = ("below_baseline", "collapsed", "diverged", "never_stops")


def majority_share(labels: list[int]) -> float:
    """Accuracy of always answering the most frequent label."""
    if not labels:
        return math.nan
    return Counter(labels).most_common(1)[0][1] / len(labels)


def flags_of(metrics: dict[str, float], per_example: dict[str, list[Any]], facts: dict[str, Any],
             primary: str | None) -> list[str]:
    """The sanity flags of one run (see the module docstring), in :data:`FLAGS` order."""
    found: set[str] = set()
    if "correct" in per_example:
        labels = [int(v) for v in per_example.get("label", [])]
        accuracy = metrics.get("accuracy")
        if accuracy is not None and labels and accuracy <= majority_share(labels) + 1e-12:
            found.add("below_baseline")
        if len(set(per_example.get("predicted", []))) == 1 and len(per_example.get("predicted", [])) > 1:
            found.add("collapsed")
    hypotheses = per_example.get("hypothesis")
    if hypotheses:
        if len(hypotheses) > 1 and len(set(hypotheses)) == 1:
            found.add("collapsed")
        stopped = per_example.get("stopped")
        if stopped and sum(stopped) / len(stopped) < MIN_STOPPED:
            found.add("never_stops")
        if primary is not None:
            baseline = metrics.get(f"baseline_{primary}")
            value = metrics.get(primary)
            if baseline is not None and value is not None and value <= baseline:
                found.add("below_baseline")
    if _diverged(metrics, facts):
        found.add("diverged")
    return [f for f in FLAGS if f in found]


def _diverged(metrics: dict[str, float], facts: dict[str, Any]) -> bool:
    first, last = facts.get("first_train_loss"), facts.get("last_train_loss")
    if facts.get("nonfinite_train_loss"):
        return True
    for key in ("val_loss", "test_loss"):
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            return True
    return isinstance(first, float) and isinstance(last, float) and last > DIVERGED_FACTOR * first
