"""Concurrent sweep training: every rank in one process, on one shared frozen base, each optimizer step running
every adapter on its own batch in a single forward pass (see :mod:`adapterhub_local.sweep.multi_lora`).

Each adapter follows the training runner's own recipe for a run (``train/loop.py``): the same batches
(``epoch_batches`` of its seed and epoch), the same AdamW parameter groups, the same linear warm-up/decay schedule, the
same gradient accumulation and per-adapter gradient clipping, the same evaluation cadence, best-checkpoint
keeping and early stopping, and the same loss (the base model's own ``loss_function`` for causal LMs, cross
entropy for classifiers). So with the same seed and the same initial weights the adapters equal the ones the
sequential runner trains, up to floating-point noise from running the base on a larger batch.
Dropout is the one exception: with non-zero dropout every adapter draws its own masks from the one shared
RNG stream, so the masks (not their distribution) differ from a solo run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from adapterhub_local.config import TrainConfig
from adapterhub_local.sweep.multi_lora import JointModel
from adapterhub_local.train.loop import (
    epoch_batches,
    linear_schedule,
    make_accelerator,
    steps_per_epoch,
    total_steps,
)
from adapterhub_local.train.tasks import IGNORE, Batch, Example

Evaluate = Callable[[torch.nn.Module], dict[str, Any]]


@dataclass
class AdapterRun:
    """One adapter's progress inside the joint run (mirrors the runner's ``LoopState``)."""

    seed: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_tokens: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    bad_evals: int = 0
    stopped_early: bool = False
    last_eval: dict[str, Any] = field(default_factory=dict)
    last_eval_step: int = -1
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Every periodic evaluation as the runner logs it: ``{"step", "epoch", "eval"}``."""

    @property
    def active(self) -> bool:
        return not self.stopped_early


@dataclass
class ConcurrentResult:
    runs: list[AdapterRun]
    total_steps: int
    wall_s: float
    """Wall time of the whole joint run (all adapters together)."""
    tokens: int
    """Real (non-padding) training tokens over all adapters."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def concat_batches(batches: Sequence[Batch], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack per-adapter batches along dim 0, right-padding token tensors to the widest."""
    width = max(b.tensors["input_ids"].shape[1] for b in batches)
    out: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for key, value in batch.tensors.items():
            if value.dim() == 2 and value.shape[1] < width:
                fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
                value = F.pad(value, (0, width - value.shape[1]), value=fill)
            out.setdefault(key, []).append(value)
    return {k: torch.cat(v, dim=0) for k, v in out.items()}


def segment_loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the model's own forward would return for this segment alone."""
    if labels.dim() == 1:  # classification: HF single-label problem type
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    vocab = int(getattr(model, "config").vocab_size)  # noqa: B009 - HF config attribute
    return model.loss_function(logits=logits, labels=labels, vocab_size=vocab)  # type: ignore[operator]


def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, n_steps: int) -> tuple[Any, Any]:
    # The runner's groups: weight decay on matrices only.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * n_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, n_steps))


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if greater_is_better else value < best


def train_concurrent(
    joint: JointModel,
    examples: Sequence[Example],
    collate: Callable[[Sequence[Example]], Batch],
    cfg: TrainConfig,
    seeds: list[int],
    pad_id: int,
    evaluate: Evaluate,
    metric: str,
    greater_is_better: bool,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> ConcurrentResult:
    """Train every adapter of ``joint`` (adapter ``i`` with seed ``seeds[i]``); keep each one's best state.

    On return each adapter's weights in ``joint`` are its best evaluation's (as the runner's ``load_best``).
    """
    accelerator = make_accelerator(cfg.precision)
    model = joint.model.to(accelerator.device)
    count = len(joint.slots)
    runs = [AdapterRun(seed=s) for s in seeds]
    n_steps = total_steps(len(examples), cfg)
    eval_every = cfg.eval_every or steps_per_epoch(len(examples), cfg)
    batch_count = math.ceil(len(examples) / cfg.batch_size)
    params = [joint.parameters_of(i) for i in range(count)]
    optimizers = [_optimizer(p, cfg, n_steps) for p in params]
    lengths = [len(e.input_ids) for e in examples]
    plans: dict[tuple[int, int], list[list[int]]] = {}
    tokens = 0
    started = time.perf_counter()

    def plan_of(run: AdapterRun) -> list[list[int]]:
        """The runner's batches of this adapter's current epoch (its seed, its epoch)."""
        key = (run.seed, run.epoch)
        if key not in plans:
            plans[key] = epoch_batches(lengths, cfg.batch_size, run.seed, run.epoch, cfg.group_by_length)
        return plans[key]

    def run_eval(i: int) -> None:
        run = runs[i]
        model.eval()
        with torch.no_grad(), joint.segments.only(i):
            result = evaluate(model)
        model.train()
        value = float(result.get(metric, float("nan")))
        run.last_eval_step, run.last_eval = run.step, result
        run.evals.append({"step": run.step, "epoch": run.epoch, "eval": result})
        if _improved(value, run.best_metric, greater_is_better):
            run.best_metric, run.best_step, run.bad_evals = value, run.step, 0
            run.best_state = joint.peft_state(i)
        else:
            run.bad_evals += 1
        patience = cfg.early_stopping_patience
        run.stopped_early = patience is not None and run.bad_evals >= patience

    model.train()
    step = 0
    while step < n_steps and any(r.active for r in runs):
        active = [i for i, r in enumerate(runs) if r.active]
        # All adapters share batch_size and the data, so their accumulation groups line up step by step.
        first = runs[active[0]].batch_in_epoch
        group = range(first, min(first + cfg.grad_accum, batch_count))
        step_loss = [0.0] * count
        for b in group:
            per_adapter = []
            for i in active:
                per_adapter.append(collate([examples[j] for j in plan_of(runs[i])[b]]))
            inputs = {k: v.to(accelerator.device) for k, v in concat_batches(per_adapter, pad_id).items()}
            labels = inputs.pop("labels")
            sizes = [0] * count
            for i, batch in zip(active, per_adapter, strict=True):
                sizes[i] = batch.tensors["input_ids"].shape[0]
            with joint.segments.use(sizes), accelerator.autocast():
                logits = model(**inputs).logits
            losses = []
            start = 0
            for i, batch in zip(active, per_adapter, strict=True):
                n, width = batch.tensors["input_ids"].shape
                seg_logits = logits[start : start + n]
                seg_labels = labels[start : start + n]
                if seg_labels.dim() == 2:
                    seg_logits, seg_labels = seg_logits[:, :width], seg_labels[:, :width]
                loss = segment_loss(model, seg_logits, seg_labels) / len(group)
                losses.append(loss)
                step_loss[i] += float(loss.detach())
                runs[i].train_tokens += batch.real_tokens
                tokens += batch.real_tokens
                start += n
            # Parameters of different adapters are disjoint: each gets exactly its own loss's gradient.
            torch.stack(losses).sum().backward()
        step += 1
        for i in active:
            run = runs[i]
            optimizer, scheduler = optimizers[i]
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params[i], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.step = step
            run.batch_in_epoch = group.stop
            if run.batch_in_epoch >= batch_count:
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
        for i in active:
            if step % eval_every == 0 or step == n_steps:
                run_eval(i)
        if on_step is not None:
            on_step(step, sum(step_loss[i] for i in active) / len(active))
    for i, run in enumerate(runs):
        if run.last_eval_step != run.step and not run.stopped_early:
            run_eval(i)
        if run.best_state is not None:
            joint.load_peft_state(i, run.best_state)
    return ConcurrentResult(runs, n_steps, time.perf_counter() - started, tokens)
