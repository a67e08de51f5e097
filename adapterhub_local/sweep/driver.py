"""``adapterhub sweep``: plan → train (sequential or concurrent) → optional truncated curve → report.

The sweep lives in ``<runs_dir>/<sweep-id>/`` (``state.json``, one run directory per point, the report).
Starting the same sweep again resumes it: finished points are skipped, registered-but-unrecorded ones are
adopted from the registry, and a point interrupted mid-run (sequential mode) continues from its checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterhub_local.config import Recipe
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.registry.fingerprint import tensor_shapes
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.plan import SweepConfig, SweepPlan, plan_sweep, target_dims
from adapterhub_local.sweep.report import PointResult, write_report
from adapterhub_local.sweep.state import SweepState, adopt_registered, result_from_card
from adapterhub_local.train.methods import DEFAULT_TARGETS


def _targets(recipe: Recipe, base_path: Path) -> tuple[list[str], bool]:
    """The recipe's target module names (or the architecture's default) and whether weights are Conv1D."""
    config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    model_type = str(config.get("model_type", ""))
    targets = recipe.method.target_modules or DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise UnsupportedError(f"no default LoRA targets for model type {model_type!r}",
                               "set method.target_modules in the recipe")
    return list(targets), model_type == "gpt2"


def make_plan(registry: Registry, recipe: Recipe, config: SweepConfig) -> SweepPlan:
    """The sweep plan, with each target's ``(d_in, d_out)`` read from the base for the over-complete check."""
    from adapterhub_local.train.runner import ensure_base

    record = ensure_base(registry, recipe)
    targets, conv1d = _targets(recipe, record.path)
    return plan_sweep(recipe, config, target_dims(tensor_shapes(record.path), targets, fan_in_fan_out=conv1d))


def run_sweep(registry: Registry, recipe: Recipe, config: SweepConfig, *, progress: bool = True,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the report summary (knee, primary metric, directory)."""
    from adapterhub_local.train.checks import check

    started = time.perf_counter()
    plan = make_plan(registry, recipe, config)
    data = check(recipe)
    sweep_dir = Path(recipe.output.runs_dir) / plan.sweep_id
    state = SweepState.open(sweep_dir, plan)
    for point in plan.points:
        if point.over_complete:
            dims = ", ".join(f"{m} {plan.module_dims[m][0]}→{plan.module_dims[m][1]}" for m in point.over_complete)
            log(f"warning: r={point.rank} is over-complete for {dims} (r > min(d_in, d_out)); "
                "training it as asked and marking it in the report")
        if not state.done(point):
            card = adopt_registered(registry, point, plan.sweep_id)
            if card is not None:
                log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed}: adopting registered {card.ref}")
                state.record(point, result_from_card(registry, card, point, config.mode))
    pending = [p for p in plan.points if not state.done(p)]
    log(f"[{plan.sweep_id}] {len(plan.points) - len(pending)} of {len(plan.points)} point(s) done; "
        f"{len(pending)} to train ({config.mode})")
    if pending and config.mode == "concurrent":
        from adapterhub_local.sweep.concurrent_run import train_concurrently

        train_concurrently(registry, plan, state, data, sweep_dir, progress=progress, log=log)
    elif pending:
        from adapterhub_local.sweep.sequential import train_sequential

        train_sequential(registry, plan, state, data, sweep_dir, progress=progress, log=log)
    if config.truncate_from is not None:
        truncated_curve(registry, plan, state, data, log=log)
    meta = {"recipe": recipe.name, "mode": config.mode, "alpha_policy": config.alpha_policy,
            "seeds": sorted({p.seed for p in plan.points}), "ranks": sorted({p.rank for p in plan.points}),
            "steps": recipe.train.max_steps, "directory": str(sweep_dir),
            "module_dims": {k: list(v) for k, v in plan.module_dims.items()},
            "elapsed_s_this_invocation": time.perf_counter() - started}
    return write_report(sweep_dir, plan.sweep_id, state.rows(), config.tolerance, meta, config.knee_metric)


def truncated_curve(registry: Registry, plan: SweepPlan, state: SweepState, data: Any,
                    *, log: Callable[[str], Any] = print) -> None:
    """SVD-truncate the ``truncate_from`` adapter (per seed) to every lower swept rank; evaluate each truncation
    with the runner's final evaluation and register it (parent = the trained adapter, tagged with the sweep)."""
    from adapterhub_local.lora import lora_scale
    from adapterhub_local.sweep.evaluation import evaluate_state, run_context
    from adapterhub_local.sweep.state import test_metrics, validation_metrics
    from adapterhub_local.sweep.truncate import truncate_and_register

    source_rank = plan.config.truncate_from
    assert source_rank is not None
    ctx = run_context(registry, plan.recipe, data)
    for source in [p for p in plan.points if p.rank == source_rank]:
        parent = state.result(source)
        if parent is None:
            raise UnsupportedError(f"r={source_rank} (seed {source.seed}) was not trained",
                                   "train it first (it is part of the sweep)")
        for point in [p for p in plan.points if p.seed == source.seed and p.rank < source_rank]:
            if state.done(point, "truncated"):
                continue
            name = f"{source.name}-trunc-r{point.rank}"
            card = truncate_and_register(registry, parent.adapter, point.rank, name=name,
                                         extra={"sweep_id": plan.sweep_id})
            recipe = point.recipe_for(plan.recipe, plan.sweep_id)
            recipe.method.alpha = parent.alpha  # the truncation keeps its parent's lora_alpha
            validation, final = evaluate_state(ctx, recipe, registry.load_adapter(card.ref).tensors)
            metrics = {**test_metrics(final), **validation_metrics(validation)}
            registry.tag(card.ref, plan.sweep_id)
            row = PointResult(rank=point.rank, seed=point.seed, adapter=card.ref, alpha=parent.alpha,
                              scale=lora_scale(parent.alpha, point.rank, source.use_rslora), series="truncated",
                              mode="svd",
                              over_complete=point.over_complete, metrics=metrics,
                              trainable_params=None, adapter_mb=_size_mb(registry, card.ref))
            state.record(point, row)
            log(f"[{plan.sweep_id}] truncated {parent.adapter} → r={point.rank}: {card.ref} "
                + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def _size_mb(registry: Registry, ref: str) -> float:
    card = registry.resolve(ref)
    return sum((registry.path_of(card) / f).stat().st_size for f in card.files) / 2**20
