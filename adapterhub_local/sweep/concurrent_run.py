"""Concurrent sweep mode, end to end: the runner's own set-up gives every point its initial adapter (same seed ⇒
same initial weights as a sequential run), one joint model trains them all (:mod:`.concurrent`), and each
trained adapter then goes through the runner's own final evaluation, saving and registration.

Run facts in a concurrent sweep are shared: ``wall_s`` of a point is its share of the joint training time
(joint time / number of points) plus its own final evaluation, ``tokens_per_s`` is its tokens over that share,
and ``peak_mem_mb`` is the peak of the whole joint process (all adapters at once).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterhub_local import runtime
from adapterhub_local.config import Recipe
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.lora import lora_scale
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.concurrent import AdapterRun, train_concurrent
from adapterhub_local.sweep.evaluation import RunContext, build_trainable, run_context, set_labels, trainable_with
from adapterhub_local.sweep.multi_lora import Slot, build_joint_model
from adapterhub_local.sweep.plan import SweepPlan, SweepPoint
from adapterhub_local.sweep.sequential import peak_rss_mb, point_run_dir, reset_peak_rss
from adapterhub_local.sweep.state import SweepState, result_from_card
from adapterhub_local.train import runner
from adapterhub_local.train.checks import PreparedData
from adapterhub_local.train.methods import default_targets, head_module, save_result


def _peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils.save_and_load import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def train_concurrently(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData, sweep_dir: Path,
                       *, progress: bool = True, log: Callable[[str], Any] = print) -> None:
    """Train every pending point of ``plan`` in one joint run, then evaluate and register each."""
    points = [p for p in plan.points if not state.done(p)]
    if not points:
        return
    recipes = [p.recipe_for(plan.recipe, plan.sweep_id) for p in points]
    first = recipes[0]
    if first.data.mix and len({p.seed for p in points}) > 1:
        raise UnsupportedError("a concurrent sweep over several seeds cannot share one mixed data set "
                               "(the mix order depends on the seed)", "use --mode sequential")
    method = first.method
    if method.name != "lora" or method.use_dora or method.init not in ("default", "gaussian") or (
            method.modules_to_save or method.trainable_tokens):
        raise UnsupportedError("concurrent sweeps train plain LoRA (no DoRA, modules_to_save or trainable tokens; "
                               "init default or gaussian)", "use --mode sequential")
    runtime.configure_recipe_threads(first.train.num_threads)
    ctx = run_context(registry, first, data)
    log(f"[{plan.sweep_id}] concurrent: preparing {len(points)} adapters (ranks {[p.rank for p in points]})")
    reset = reset_peak_rss()
    started = time.perf_counter()
    initial, trainable_params = [], []
    for recipe in recipes:
        trainable = build_trainable(recipe, ctx.record, ctx.labels)
        initial.append(_peft_state(trainable.model))
        trainable_params.append(trainable.trainable_params)
        del trainable
    base = runner.load_model(first, ctx.record, len(ctx.labels) if ctx.labels else None)
    set_labels(base, ctx.labels)
    targets = list(first.method.target_modules or default_targets(base))
    head = head_module(base) if ctx.labels is not None else None
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
                              ctx.pad_id, ctx.periodic, ctx.metric, ctx.greater_is_better, on_step=on_step)
    joint_peak = peak_rss_mb() if reset else None
    share = result.wall_s / len(points)
    trained_states = [joint.peft_state(i) for i in range(len(points))]
    del joint, base
    log(f"[{plan.sweep_id}] concurrent: joint training took {result.wall_s:.1f} s "
        f"({result.tokens_per_s:.0f} tokens/s over all adapters); evaluating and registering each")
    for i, (point, recipe) in enumerate(zip(points, recipes, strict=True)):
        _finish_point(registry, plan, state, data, sweep_dir, ctx, point, recipe, trained_states[i], result.runs[i],
                      share, trainable_params[i], joint_peak)
    log(f"[{plan.sweep_id}] concurrent: done in {time.perf_counter() - started:.1f} s")


def _finish_point(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData, sweep_dir: Path,
                  ctx: RunContext, point: SweepPoint, recipe: Recipe, trained_state: dict[str, torch.Tensor],
                  run: AdapterRun, share: float, trainable_params: int, joint_peak: float | None) -> None:
    """The runner's tail for one adapter: final evaluation, run directory, PEFT save, registration."""
    started = time.perf_counter()
    trainable = trainable_with(ctx, recipe, trained_state)
    run_dir = point_run_dir(sweep_dir, point)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runner.RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2), encoding="utf-8")
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as handle:
        for record_ in run.evals:
            handle.write(json.dumps(record_, default=float) + "\n")
    final, samples = runner.final_eval(recipe, trainable, ctx.tokenizer, ctx.encoded, ctx.labels, ctx.pad_id)
    wall = share + time.perf_counter() - started
    training = {
        "method": trainable.method, "trainable_params": trainable_params, "total_params": trainable.total_params,
        "trainable_fraction": trainable_params / max(trainable.total_params, 1), "steps": run.step,
        "best_step": run.best_step, "best_metric": {ctx.metric: run.best_metric}, "stopped_early": run.stopped_early,
        "train_seconds": share, "train_tokens": run.train_tokens,
        "tokens_per_s": run.train_tokens / share if share > 0 else 0.0, "wall_time_s": wall,
        "peak_memory_mb": joint_peak, "peak_memory_kind": "process_peak_rss_joint_run",
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "precision": runtime.resolve_precision(recipe.train.precision), "mode": "concurrent", "sweep_id": plan.sweep_id,
        "train_examples": len(ctx.encoded.train), "validation_examples": len(ctx.encoded.validation),
    }
    forgetting = final.pop("forgetting", None)
    if forgetting is not None:
        training["forgetting"] = forgetting
    save_result(trainable, run_dir / "adapter")
    card, why_not = runner.register_result(recipe, data, registry, trainable, run_dir, final, training, ctx.labels)
    if card is None:
        raise UnsupportedError(f"r={point.rank} was not registered: {why_not}", "set output.register: true")
    (run_dir / runner.FINAL).write_text(json.dumps({"metrics": final, "training": training, "registered": card.ref,
                                                    "samples": samples}, indent=2, default=float), encoding="utf-8")
    state.record(point, result_from_card(registry, card, point, "concurrent"))
