"""Concurrent sweep mode, end to end: the runner's own set-up gives every point its initial adapter (same seed ⇒
same initial weights as a sequential run), one joint model trains a group of them (:mod:`.concurrent`), and
each trained adapter is then finished by the unit of work ``train/`` owns
(:func:`adapterhub_local.train.unit.finish_unit`: the runner's final evaluation, saving and registration).

:func:`train_group` trains one group and returns its units' results without touching the sweep state, so the
local executor (one group: every pending point) and the Ray executor (several groups, one per Ray task) share
it; only the driver records results.

Run facts in a concurrent sweep are shared: ``wall_s`` of a point is its share of the joint training time
(joint time / number of points) plus its own final evaluation, ``tokens_per_s`` is its tokens over that share,
and ``peak_mem_mb`` is the peak of the whole joint process (all adapters of its group at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterhub_local import runtime
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.lora import lora_scale
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.concurrent import train_concurrent
from adapterhub_local.sweep.multi_lora import Slot, build_joint_model
from adapterhub_local.sweep.plan import SweepPlan, SweepPoint
from adapterhub_local.sweep.sequential import point_request, point_row
from adapterhub_local.sweep.state import SweepState
from adapterhub_local.train.unit import (
    PreparedData,
    TrainedElsewhere,
    UnitResult,
    adapter_layout,
    base_model,
    finish_unit,
    initial_adapter,
    open_context,
    peak_rss_mb,
    reset_peak_rss,
)


def check_concurrent(plan: SweepPlan, points: list[SweepPoint]) -> None:
    """Refuse what one joint model cannot train."""
    first = plan.recipe
    if first.data.mix and len({p.seed for p in points}) > 1:
        raise UnsupportedError("a concurrent sweep over several seeds cannot share one mixed data set "
                               "(the mix order depends on the seed)", "use --mode sequential")
    method = first.method
    if method.name != "lora" or method.use_dora or method.init not in ("default", "gaussian") or (
            method.modules_to_save or method.trainable_tokens):
        raise UnsupportedError("concurrent sweeps train plain LoRA (no DoRA, modules_to_save or trainable tokens; "
                               "init default or gaussian)", "use --mode sequential")


def train_concurrently(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData, sweep_dir: Path,
                       *, progress: bool = True, log: Callable[[str], Any] = print) -> None:
    """Train every pending point of ``plan`` in one joint run, then evaluate, register and record each."""
    points = [p for p in plan.points if not state.done(p)]
    if not points:
        return
    for point, result in zip(points, train_group(registry, plan, points, data, sweep_dir, progress=progress,
                                                 log=log), strict=True):
        state.record(point, point_row(registry, point, result, "concurrent"))


def train_group(registry: Registry, plan: SweepPlan, points: list[SweepPoint], data: PreparedData, sweep_dir: Path,
                *, progress: bool = True, log: Callable[[str], Any] = print,
                data_fingerprint: str | None = None) -> list[UnitResult]:
    """Train ``points`` in one joint model, then finish (evaluate, save, register) each; results in order."""
    check_concurrent(plan, points)
    requests = [point_request(plan, p, sweep_dir, data_fingerprint) for p in points]
    recipes = [r.recipe for r in requests]
    first = recipes[0]
    runtime.configure_recipe_threads(first.train.num_threads)
    ctx = open_context(registry, first, data)
    log(f"[{plan.sweep_id}] concurrent: preparing {len(points)} adapters (ranks {[p.rank for p in points]})")
    reset = reset_peak_rss()
    started = time.perf_counter()
    initial, trainable_params = [], []
    for recipe in recipes:
        state_dict, count = initial_adapter(ctx, recipe)
        initial.append(state_dict)
        trainable_params.append(count)
    base = base_model(ctx)
    targets, head = adapter_layout(ctx, base)
    slots = [Slot(p.rank, lora_scale(p.alpha, p.rank, p.use_rslora), first.method.dropout) for p in points]
    joint = build_joint_model(base, targets, slots, [head] if head else None)
    for i, state_dict in enumerate(initial):
        joint.load_peft_state(i, state_dict)
    del initial

    def on_step(step: int, loss: torch.Tensor) -> None:
        # ``loss`` stays a tensor: it leaves the device only when a line is logged.
        if progress and (step % max(first.train.log_every, 1) == 0):
            log(f"[{plan.sweep_id}] joint step {step}: mean loss {float(loss):.4f}")

    log(f"[{plan.sweep_id}] concurrent: training {len(points)} adapters in one joint model")
    result = train_concurrent(joint, ctx.encoded.train, ctx.collate, first.train, [p.seed for p in points],
                              ctx.pad_id, ctx.periodic, ctx.metric, ctx.greater_is_better, on_step=on_step,
                              log=lambda line: log(f"[{plan.sweep_id}] {line}"))
    joint_peak = peak_rss_mb() if reset else None
    share = result.wall_s / len(points)
    trained_states = [joint.peft_state(i) for i in range(len(points))]
    del joint, base
    log(f"[{plan.sweep_id}] concurrent: joint training took {result.wall_s:.1f} s "
        f"({result.tokens_per_s:.0f} tokens/s over all adapters); evaluating and registering each")
    out = []
    for i, request in enumerate(requests):
        run = result.runs[i]
        trained = TrainedElsewhere(
            trained_states[i], run.evals, run.step, run.best_step, run.best_metric, run.stopped_early, share,
            run.train_tokens, trainable_params[i], joint_peak, "process_peak_rss_joint_run",
            {"mode": "concurrent", "sweep_id": plan.sweep_id})
        out.append(finish_unit(request, registry, data, ctx, trained))
    log(f"[{plan.sweep_id}] concurrent: done in {time.perf_counter() - started:.1f} s")
    return out
