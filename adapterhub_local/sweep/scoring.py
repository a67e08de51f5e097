"""Extra scoring of a generation sweep's rows after training, from what their evaluation kept:

* the E2E challenge's metrics (NIST, METEOR, CIDEr beside the BLEU and ROUGE-L every run has), computed from each
  row's kept hypotheses and the test prompts' references (all references of an MR together); METEOR runs once,
  in one Java process, for every row;
* beam search: each trained adapter's test prompts decoded again with ``num_beams`` beams, scored the same way
  and stored as ``beam_*`` metrics beside the greedy ones.

Scores are written into the rows (and so into the sweep state): a resumed sweep does not compute them again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from adapterhub_local import metrics
from adapterhub_local.sweep.report_rows import PointResult

E2E_EXTRA = ("nist", "meteor", "cider")


def needs_e2e(row: PointResult, prefix: str = "") -> bool:
    return bool(row.per_example.get(f"{prefix}hypothesis")) and f"{prefix}nist" not in row.metrics


def add_e2e_metrics(rows: Sequence[PointResult], references: Sequence[Sequence[str]], *, prefix: str = "",
                    log: Callable[[str], Any] = print) -> list[PointResult]:
    """Score every row whose kept ``<prefix>hypothesis`` lacks the E2E metrics; returns the rows changed."""
    todo = [r for r in rows if needs_e2e(r, prefix)]
    todo = [r for r in todo if len(r.per_example[f"{prefix}hypothesis"]) == len(references)]
    if not todo:
        return []
    why = metrics.meteor_available()
    meteors = (metrics.meteor_many([r.per_example[f"{prefix}hypothesis"] for r in todo], references)
               if why is None else None)
    if why is not None:
        log(f"METEOR left out: {why}")
    for i, row in enumerate(todo):
        hypotheses = row.per_example[f"{prefix}hypothesis"]
        row.metrics[f"{prefix}nist"] = metrics.nist(hypotheses, references)
        row.metrics[f"{prefix}cider"], row.per_example[f"{prefix}cider"] = metrics.cider(hypotheses, references)
        if meteors is not None:
            row.metrics[f"{prefix}meteor"], row.per_example[f"{prefix}meteor"] = meteors[i]
    return todo


def beam_metrics(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """A beam-search generation evaluation as ``beam_*`` metrics and per-example record entries."""
    scalars = {f"beam_{k}": float(v) for k, v in result.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("n", "num_beams")}
    record = result.get("per_example", {})
    kept = {f"beam_{k}": list(v) for k, v in record.items() if k in ("hypothesis", "stopped", "rougeL", "bleu_stats")}
    return scalars, kept
