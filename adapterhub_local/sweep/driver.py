"""``adapterhub sweep``: plan → train (sequential or concurrent) → optional truncated curve → extra scoring
(E2E metrics, beam search) → rank advice → report.

With ``--advise`` only the highest rank is trained (per seed) and the lower ranks come from its SVD
truncations (:mod:`adapterhub_local.sweep.advisor`); the same sweep run later without ``--advise`` trains the
rest and its report sets the prediction beside the trained ranks.

The sweep lives in ``<runs_dir>/<sweep-id>/`` (``state.json``, one run directory per point, the report).
Starting the same sweep again resumes it: finished points are skipped, registered-but-unrecorded ones are
adopted from the registry, and a point interrupted mid-run (sequential mode) continues from its checkpoint.

Every point is one unit of work of ``train/`` (:mod:`adapterhub_local.train.unit`). Where the pending points run
is the executor's choice, not part of the plan: ``local`` (this process) or ``ray``
(:mod:`adapterhub_local.sweep.ray_executor`: one Ray task per point, or per group of points in concurrent mode).
This process alone writes ``state.json`` and the report, so a sweep resumes under either executor.
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
from adapterhub_local.sweep.plan import SweepConfig, SweepPlan, SweepPoint, plan_sweep, target_dims, validate
from adapterhub_local.sweep.ray_executor import ExecutorOptions
from adapterhub_local.sweep.report import PointResult, write_report
from adapterhub_local.sweep.state import SweepState, adopt_registered, result_from_card
from adapterhub_local.train import unit
from adapterhub_local.train.unit import PreparedData


def make_plan(registry: Registry, recipe: Recipe, config: SweepConfig, train_rows: int | None = None) -> SweepPlan:
    """The sweep plan, with each target's ``(d_in, d_out)`` read from the base for the over-complete check."""
    record = unit.ensure_base(registry, recipe)
    targets, conv1d = unit.recipe_targets(recipe, record.path)
    return plan_sweep(recipe, config, target_dims(tensor_shapes(record.path), targets, fan_in_fan_out=conv1d),
                      train_rows)


def train_rows(recipe: Recipe, data: PreparedData) -> int:
    """Training rows a run of ``recipe`` uses (the largest source's, capped by ``data.max_train_examples``)."""
    rows = max(len(s.splits.train) for s in data.sources)
    cap = recipe.data.max_train_examples
    return min(rows, cap) if cap else rows


def run_sweep(registry: Registry, recipe: Recipe, config: SweepConfig, *, progress: bool = True,
              log: Callable[[str], Any] = print, executor: ExecutorOptions | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the report summary (knee, primary metric, directory). ``executor``:
    where the pending points train (default: this process; see :mod:`adapterhub_local.sweep.ray_executor`)."""
    started = time.perf_counter()
    executor = executor or ExecutorOptions()
    executor.validate()
    validate(config, recipe)  # the sweep options first: they are cheap to check and the data is not
    data = unit.prepare_data(recipe)
    plan = make_plan(registry, recipe, config, train_rows(recipe, data))
    sweep_dir = Path(recipe.output.runs_dir) / plan.sweep_id
    state = SweepState.open(sweep_dir, plan)
    top = max(config.ranks)
    to_train = [p for p in plan.points if not config.advise or p.rank == top]
    for point in to_train:
        if point.over_complete:
            dims = ", ".join(f"{m} {plan.module_dims[m][0]}→{plan.module_dims[m][1]}" for m in point.over_complete)
            log(f"warning: r={point.rank} is over-complete for {dims} (r > min(d_in, d_out)); "
                "training it as asked and marking it in the report")
        if not state.done(point):
            card = adopt_registered(registry, point, plan.sweep_id)
            if card is not None:
                log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed}: adopting registered {card.ref}")
                state.record(point, result_from_card(registry, card, point, config.mode))
    pending = [p for p in to_train if not state.done(p)]
    log(f"[{plan.sweep_id}] {len(to_train) - len(pending)} of {len(to_train)} point(s) done; "
        f"{len(pending)} to train ({config.mode})" + (f"; advisor: training r={top} only" if config.advise else ""))
    if pending and executor.executor == "ray":
        from adapterhub_local.sweep.ray_executor import train_on_ray

        train_on_ray(registry, plan, state, data, sweep_dir, pending, executor,
                     concurrent=config.mode == "concurrent" and not config.advise, log=log)
    elif pending and config.mode == "concurrent" and not config.advise:
        from adapterhub_local.sweep.concurrent_run import train_concurrently

        train_concurrently(registry, plan, state, data, sweep_dir, progress=progress, log=log)
    advice_file = sweep_dir / "advice.json"
    # A sweep the advisor ran before keeps its advice up to date: the full sweep's report checks it.
    earlier = _advised_rank(advice_file)
    truncate_from = top if config.advise else (config.truncate_from or earlier)
    if pending and executor.executor != "ray" and (config.mode != "concurrent" or config.advise):
        from adapterhub_local.sweep.sequential import train_sequential

        def score_when_trained(point: SweepPoint) -> None:
            # A point's extra scores (and a source's truncations) are computed as soon as it is trained, not after
            # the whole sweep: a long sweep interrupted later keeps them in its state, and the adapters they need
            # exist now (runs/ and the registry do not travel to a new machine; the state can).
            keys = {point.key}
            if point.rank == truncate_from and point.fraction == max(config.data_fractions):
                truncated_curve(registry, plan, state, data, log=log, source_rank=truncate_from, sources=[point])
                keys |= {p.key for p in _truncation_points(plan, point, truncate_from)}
            if recipe.task.type != "classification" and (config.e2e_metrics or config.num_beams > 1):
                extra_scoring(registry, plan, state, data, log=log, keys=keys)

        train_sequential(registry, plan, state, data, sweep_dir, progress=progress, log=log, points=to_train,
                         after_point=score_when_trained)
    if truncate_from is not None:
        truncated_curve(registry, plan, state, data, log=log, source_rank=truncate_from)
    if recipe.task.type != "classification" and (config.e2e_metrics or config.num_beams > 1):
        extra_scoring(registry, plan, state, data, log=log)
    rows = state.rows()
    advice = None
    if truncate_from is not None and (config.advise or earlier is not None):
        from adapterhub_local.sweep.advisor import advise
        from adapterhub_local.sweep.report_rows import primary_metric

        metric = config.knee_metric or primary_metric(rows)
        advice = advise(registry, rows, truncate_from, metric, config.tolerance,
                        max(config.data_fractions)) if metric else None
        if advice is not None:
            advice_file.write_text(json.dumps(advice, indent=2, sort_keys=True, default=str), encoding="utf-8")
    meta = {"recipe": recipe.name, "mode": config.mode, "executor": executor.executor,
            "alpha_policy": config.alpha_policy,
            "seeds": sorted({p.seed for p in plan.points}), "ranks": sorted({p.rank for p in plan.points}),
            "steps": recipe.train.max_steps, "epochs": recipe.train.epochs, "directory": str(sweep_dir),
            "num_beams": config.num_beams if config.num_beams > 1 else None, "advise": config.advise,
            "module_dims": {k: list(v) for k, v in plan.module_dims.items()},
            "elapsed_s_this_invocation": time.perf_counter() - started}
    return write_report(sweep_dir, plan.sweep_id, rows, config.tolerance, meta, config.knee_metric, advice)


def _advised_rank(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("source_rank")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def extra_scoring(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData,
                  *, log: Callable[[str], Any] = print, keys: set[str] | None = None) -> None:
    """E2E metrics for every generation row, and beam-search evaluation of every trained adapter when asked;
    ``keys``: only the rows of these points (default: all)."""
    from adapterhub_local.sweep.scoring import add_e2e_metrics, beam_metrics, needs_e2e

    config = plan.config
    points = {p.key: p for p in plan.points}
    rows = [r for r in state.rows() if keys is None or SweepPoint.key_of(r.rank, r.seed, r.fraction) in keys]
    beam_rows = [r for r in rows if config.num_beams > 1 and r.series == "trained" and "beam_bleu" not in r.metrics]
    if not beam_rows and not (config.e2e_metrics and any(needs_e2e(r, p) for r in rows for p in ("", "beam_"))):
        return
    ctx = unit.open_context(registry, plan.recipe, data)
    references = [p.references for p in ctx.encoded.prompts]
    changed: dict[int, PointResult] = {}
    for row in beam_rows:
        log(f"[{plan.sweep_id}] beam search ({config.num_beams} beams): {row.adapter}")
        scalars, record = beam_metrics(unit.beam_eval(ctx, registry, row.adapter, config.num_beams))
        row.metrics.update(scalars)
        row.per_example.update(record)
        changed[id(row)] = row
    if config.e2e_metrics:
        for prefix in ("", "beam_"):
            for row in add_e2e_metrics(rows, references, prefix=prefix, log=log):
                changed[id(row)] = row
    for row in changed.values():
        state.record(points[SweepPoint.key_of(row.rank, row.seed, row.fraction)], row)


def truncated_curve(registry: Registry, plan: SweepPlan, state: SweepState, data: Any,
                    *, log: Callable[[str], Any] = print, source_rank: int | None = None,
                    sources: list[SweepPoint] | None = None) -> None:
    """SVD-truncate the ``truncate_from`` adapter (per seed) to every lower swept rank; evaluate each truncation
    with the runner's final evaluation and register it (parent = the trained adapter, tagged with the sweep).
    ``sources``: only these trained points of the source rank (default: every seed's)."""
    from adapterhub_local.lora import lora_scale
    from adapterhub_local.sweep.state import per_example_of, test_metrics, validation_metrics
    from adapterhub_local.sweep.truncate import truncate_and_register

    source_rank = source_rank if source_rank is not None else plan.config.truncate_from
    assert source_rank is not None
    fraction = max(plan.config.data_fractions)
    if sources is None:
        sources = [p for p in plan.points if p.rank == source_rank and p.fraction == fraction]
    if all(state.done(p, "truncated") for s in sources for p in _truncation_points(plan, s, source_rank)):
        return
    ctx = unit.open_context(registry, plan.recipe, data)
    for source in sources:
        parent = state.result(source)
        if parent is None:
            raise UnsupportedError(f"r={source_rank} (seed {source.seed}) was not trained",
                                   "train it first (it is part of the sweep)")
        for point in _truncation_points(plan, source, source_rank):
            if state.done(point, "truncated"):
                continue
            name = f"{source.name}-trunc-r{point.rank}"
            card = truncate_and_register(registry, parent.adapter, point.rank, name=name,
                                         extra={"sweep_id": plan.sweep_id})
            recipe = point.recipe_for(plan.recipe, plan.sweep_id)
            recipe.method.alpha = parent.alpha  # the truncation keeps its parent's lora_alpha
            validation, final = unit.evaluate_state(ctx, recipe, registry.load_adapter(card.ref).tensors)
            metrics = {**test_metrics(final), **validation_metrics(validation)}
            facts = {k: v for k, v in parent.facts.items() if not k.endswith("train_loss")}
            registry.tag(card.ref, plan.sweep_id)
            row = PointResult(rank=point.rank, seed=point.seed, adapter=card.ref, alpha=parent.alpha,
                              scale=lora_scale(parent.alpha, point.rank, source.use_rslora), series="truncated",
                              mode="svd",
                              over_complete=point.over_complete, metrics=metrics,
                              trainable_params=None, adapter_mb=_size_mb(registry, card.ref), fraction=point.fraction,
                              per_example=per_example_of(final, validation), facts=facts)
            state.record(point, row)
            log(f"[{plan.sweep_id}] truncated {parent.adapter} → r={point.rank}: {card.ref} "
                + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("baseline_")))


def _truncation_points(plan: SweepPlan, source: SweepPoint, source_rank: int) -> list[SweepPoint]:
    """The points a source's truncations stand for: its seed's lower swept ranks at its data fraction."""
    return [p for p in plan.points if p.seed == source.seed and p.rank < source_rank and p.fraction == source.fraction]


def _size_mb(registry: Registry, ref: str) -> float:
    card = registry.resolve(ref)
    return sum((registry.path_of(card) / f).stat().st_size for f in card.files) / 2**20
