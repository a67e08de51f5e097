"""A sweep's progress on disk (``runs/<sweep-id>/state.json``), so an interrupted sweep resumes where it stopped.

A point counts as done once its adapter is registered and its row is saved here. A crash between the two is
healed from the registry: every sweep adapter is tagged with the sweep id, so a registered-but-unrecorded
point is adopted from its card instead of being trained again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_local.config import recipe_values_off_default
from adapterhub_local.errors import ConfigError, NotFoundError
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.plan import SweepPlan, SweepPoint
from adapterhub_local.sweep.report import PointResult, numeric_metrics

STATE_FILE = "state.json"


@dataclass
class SweepState:
    directory: Path
    plan: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``<series>:<point key>`` → a :class:`PointResult` as a dict."""

    @classmethod
    def open(cls, directory: Path, plan: SweepPlan) -> SweepState:
        """Load the sweep's state, or start it; refuse a directory that holds a different plan."""
        path = directory / STATE_FILE
        planned = json.loads(json.dumps(plan.to_dict(), default=str))
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            state = cls(directory, planned)
            state.save()
            return state
        data = json.loads(path.read_text(encoding="utf-8"))
        if _identity(data["plan"]) != _identity(planned):
            raise ConfigError([f"{directory} holds sweep {data['plan'].get('sweep_id')!r} with a different plan"],
                              "give another --sweep-id, or re-run with the original recipe and options",
                              what="sweep")
        return cls(directory, planned, dict(data.get("results", {})))

    def save(self) -> None:
        payload = json.dumps({"plan": self.plan, "results": self.results}, indent=2, sort_keys=True, default=str)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".state-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / STATE_FILE)

    def done(self, point: SweepPoint, series: str = "trained") -> bool:
        return f"{series}:{point.key}" in self.results

    def record(self, point: SweepPoint, result: PointResult) -> None:
        self.results[f"{result.series}:{point.key}"] = result.__dict__
        self.save()

    def rows(self) -> list[PointResult]:
        return [PointResult.from_dict(v) for _, v in sorted(self.results.items())]

    def result(self, point: SweepPoint, series: str = "trained") -> PointResult | None:
        data = self.results.get(f"{series}:{point.key}")
        return PointResult.from_dict(data) if data else None


def _identity(plan: dict[str, Any]) -> Any:
    # What may change between attempts: the mode (a concurrent sweep may be finished sequentially), the knee
    # tolerance, a truncated curve added to a finished sweep, the advisor run before the full sweep, and beam
    # evaluation added later. Fields added since a sweep was started take their defaults, so it still resumes.
    # The name given with --sweep-id is how the directory was found, not part of the plan.
    free = ("mode", "tolerance", "truncate_from", "knee_metric", "advise", "num_beams", "e2e_metrics", "sweep_id")
    config = {"data_fractions": [1.0], **{k: v for k, v in plan.get("config", {}).items() if k not in free}}
    points = [{"fraction": 1.0, "train_examples": None, **p} for p in plan.get("points", [])]
    recipe = plan.get("recipe")
    return [recipe_values_off_default(recipe) if isinstance(recipe, dict) else recipe, config, points]


def adopt_registered(registry: Registry, point: SweepPoint, sweep_id: str) -> AdapterCard | None:
    """The card of this point's adapter if a previous attempt registered and tagged it, else None."""
    try:
        card = registry.resolve(f"{point.name}:{sweep_id}")
    except NotFoundError:
        return None
    return card if card.rank == point.rank else None


def result_from_card(registry: Registry, card: AdapterCard, point: SweepPoint, mode: str,
                     series: str = "trained") -> PointResult:
    """A report row from a registered card (its metrics and the run facts the runner recorded)."""
    training = card.training
    run_dir = Path(str(card.extra.get("run_dir", "")))
    validation = validation_at_best(run_dir, training.get("best_step"))
    size = sum((registry.path_of(card) / f).stat().st_size for f in card.files)
    scale = point.alpha / (point.rank**0.5 if point.use_rslora else point.rank)
    train_cfg = card.recipe.get("train", {}) if isinstance(card.recipe, dict) else {}
    steps = training.get("steps")
    per_step = int(train_cfg.get("batch_size", 0) or 0) * int(train_cfg.get("grad_accum", 1) or 1)
    seen = steps * per_step if isinstance(steps, int) and per_step else None
    rows = training.get("train_examples")
    facts: dict[str, Any] = {
        # Epochs as examples seen over training examples (fractional: a 20-step run may see a tenth of the data).
        "steps": steps, "epochs": seen / rows if seen is not None and rows else training.get("epochs_completed"),
        "train_examples": rows, "examples_seen": seen, "data_fraction": point.fraction, **loss_trace(run_dir),
    }
    if any(isinstance(v, float) and not math.isfinite(v) for k, v in card.metrics.items() if "loss" in k):
        facts["nonfinite_train_loss"] = True
    return PointResult(
        rank=point.rank, seed=point.seed, adapter=card.ref, alpha=point.alpha, scale=scale, series=series,
        mode=mode, over_complete=point.over_complete,
        metrics={**test_metrics(card.metrics), **validation_metrics(validation)},
        trainable_params=training.get("trainable_params"), adapter_mb=size / 2**20,
        wall_s=training.get("wall_time_s"), tokens_per_s=training.get("tokens_per_s"),
        peak_mem_mb=training.get("peak_memory_mb"), fraction=point.fraction,
        per_example=per_example_of(card.metrics, validation), facts=facts,
    )


def per_example_of(metrics: dict[str, Any], validation: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """The per-example records the evaluations kept (empty for runs evaluated before they were kept): the final
    task evaluation's as they are, the test loss's as ``test_nll`` / ``test_tokens``, and the kept validation
    evaluation's prefixed ``val_`` (``val_nll``, ``val_correct`` …)."""
    out: dict[str, list[Any]] = {}
    for record, prefix in ((metrics.get("per_example"), ""), (metrics.get("test_per_example"), "test_"),
                           ((validation or {}).get("per_example"), "val_")):
        if isinstance(record, dict):
            out.update({f"{prefix}{k}": list(v) for k, v in record.items() if isinstance(v, list)})
    return out


def loss_trace(run_dir: Path) -> dict[str, Any]:
    """First and last logged training loss of a run, and whether any logged loss was not finite."""
    log = run_dir / "metrics.jsonl"
    if not run_dir.name or not log.is_file():
        return {}
    losses: list[float] = []
    nonfinite = False
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        loss = record.get("loss")
        if isinstance(loss, int | float):
            losses.append(float(loss))
            nonfinite |= not math.isfinite(float(loss))
        evaluation = record.get("eval")
        if isinstance(evaluation, dict):
            nonfinite |= any(isinstance(v, float) and not math.isfinite(v)
                             for k, v in evaluation.items() if "loss" in k)
    out: dict[str, Any] = {"nonfinite_train_loss": nonfinite}
    if losses:
        out["first_train_loss"], out["last_train_loss"] = losses[0], losses[-1]
    return out


def test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The final (held-out test) metrics as report columns: the test loss is ``test_loss`` so that
    ``val_loss`` always means the validation loss."""
    out = {}
    baseline = metrics.get("baseline_copy_input")
    if isinstance(baseline, dict):
        out.update({f"baseline_{k}": v for k, v in numeric_metrics(baseline).items()})
    for key, value in numeric_metrics(metrics).items():
        if key in ("n", "samples"):
            continue
        if key in ("val_loss", "test_val_loss"):
            key = "test_loss"
        out[key] = value
    return out


def validation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The periodic validation metrics as report columns, all prefixed ``val_`` (``val_loss``, ``val_accuracy``,
    ``val_perplexity`` …) so they never shadow the held-out test metrics."""
    return {k if k.startswith("val_") else f"val_{k}": v for k, v in numeric_metrics(metrics).items()
            if k not in ("n", "samples")}


def validation_at_best(run_dir: Path, best_step: int | None) -> dict[str, Any]:
    """The periodic validation evaluation the run kept as best (from the run's ``metrics.jsonl``); the last
    one when no best was recorded; empty when the log is missing."""
    log = run_dir / "metrics.jsonl"
    if not run_dir.name or not log.is_file():
        return {}
    evals = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(record, dict) and isinstance(record.get("eval"), dict):
            evals.append(record)
    chosen = [r for r in evals if r.get("step") == best_step] or evals[-1:]
    return dict(chosen[-1]["eval"]) if chosen else {}
