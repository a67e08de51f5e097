"""Concurrent sweep training: every rank in one process, on one shared frozen base, each optimizer step running
every adapter on its own batch in a single forward pass (see :mod:`adapterhub_local.sweep.multi_lora`).

Each adapter follows the training runner's own recipe for a run (``train/loop.py``, whose pieces it calls): the
same batches (``epoch_batches`` of its seed and epoch), the same AdamW parameter groups (``make_optimizer``: one
AdamW over the stacked adapter parameters — AdamW is elementwise, so each adapter's slice moves as its own
optimizer would move it), the same linear warm-up/decay schedule, the same gradient accumulation, gradient
clipping per adapter (vectorised: ``JointModel.clip_grad_norms_``), the same evaluation cadence, best-checkpoint
keeping and early stopping (``note_evaluation``), the same ``train.compile`` decision (the base's blocks, with
their multi-adapter layers, compiled for training steps: ``train/compilation.py``), and the same loss: the loop's
LM head on labelled positions only (``train/lm_loss.py``) for causal LMs, cross entropy for classifiers — every
adapter's loss at once, summed per adapter with one ``index_add`` (:func:`segment_losses`). So with the same seed
and the same initial weights the adapters equal the ones the sequential runner trains, up to floating-point noise
from running the base on a larger batch. Dropout is the one exception: with non-zero dropout every adapter draws
its own masks from the one shared RNG stream, so the masks (not their distribution) differ from a solo run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from adapterhub_local import runtime
from adapterhub_local.config import TrainConfig
from adapterhub_local.sweep.multi_lora import JointModel
from adapterhub_local.train import lm_loss
from adapterhub_local.train.compilation import compile_for_training
from adapterhub_local.train.loop import (
    Prefetcher,
    epoch_batches,
    forward_context,
    make_accelerator,
    make_optimizer,
    note_evaluation,
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


def segment_losses(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   row_owner: torch.Tensor, counts: torch.Tensor, fast: bool) -> torch.Tensor:
    """Every adapter's loss at once (``[adapters]``), each the loss the model's own forward would return for
    its segment alone: the mean next-token cross entropy over its labelled positions (causal LM) or the mean
    cross entropy over its rows (classifier). Per-token losses are summed per adapter with one ``index_add``.

    ``labels`` and ``row_owner`` (each batch row's adapter) stay on the host; ``counts``: each adapter's number
    of labelled positions (causal) or rows (classifier), on the device, at least 1."""
    device = counts.device
    if labels.dim() == 2 and fast:
        targets = lm_loss.label_targets(labels)
        hidden, head = lm_loss.labelled_hidden(model, inputs, targets.to(device))
        losses = lm_loss.token_losses(hidden, targets.tokens.to(device, non_blocking=True), head)
        owner = row_owner[targets.rows].to(device, non_blocking=True)
    else:
        logits = model(**inputs).logits
        if labels.dim() == 1:  # classification: HF single-label problem type
            losses = F.cross_entropy(logits.float(), labels.to(device, non_blocking=True), reduction="none")
            owner = row_owner.to(device, non_blocking=True)
        else:  # the model's own causal loss, per token: logits upcast, position t predicts token t + 1
            shifted = labels[:, 1:].to(device, non_blocking=True)
            per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, reduction="none")
            losses = per_token.sum(dim=1)  # ignored positions contribute 0
            owner = row_owner.to(device, non_blocking=True)
    total = torch.zeros(counts.shape[0], device=device, dtype=losses.dtype).index_add(0, owner, losses)
    return total / counts


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
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    log: Callable[[str], Any] = lambda _: None,
) -> ConcurrentResult:
    """Train every adapter of ``joint`` (adapter ``i`` with seed ``seeds[i]``); keep each one's best state.

    On return each adapter's weights in ``joint`` are its best evaluation's (as the runner's ``load_best``).
    ``train.compile`` applies as in the loop: the base's blocks (with their multi-adapter layers) run compiled for
    training steps and eagerly for evaluations.
    """
    accelerator = make_accelerator(cfg.precision)
    model = joint.model.to(accelerator.device)
    runtime.upcast_trainable(model)  # fp32 adapters and optimizer state over a (possibly bf16) base
    count = len(joint.slots)
    runs = [AdapterRun(seed=s) for s in seeds]
    n_steps = total_steps(len(examples), cfg)
    eval_every = cfg.eval_every or steps_per_epoch(len(examples), cfg)
    batch_count = math.ceil(len(examples) / cfg.batch_size)
    # One AdamW over every adapter's stacked parameters: AdamW is elementwise, so each adapter's slice moves
    # exactly as its own optimizer would move it (same groups, same schedule; all adapters share the step count).
    optimizer, scheduler = make_optimizer(joint.trainable_parameters(), cfg, n_steps)
    fast = lm_loss.supports(model, {"labels": torch.zeros(1, 1)})
    prefetch = Prefetcher(collate, examples)
    lengths = [len(e.input_ids) for e in examples]
    plans: dict[tuple[int, int], list[list[int]]] = {}
    tokens = 0
    compiled = compile_for_training(model, cfg.compile, device=accelerator.device, steps=n_steps, processes=1,
                                    log=log)
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
        with compiled.paused(), torch.no_grad(), joint.segments.only(i), forward_context(accelerator, cfg.precision):
            result = evaluate(model)
        model.train()
        value = float(result.get(metric, float("nan")))
        run.last_eval_step, run.last_eval = run.step, result
        run.evals.append({"step": run.step, "epoch": run.epoch, "eval": result})
        if note_evaluation(run, value, greater_is_better, cfg.early_stopping_patience):
            run.best_state = joint.peft_state(i)

    model.train()
    compiled.on()
    step = 0
    try:
        while step < n_steps and any(r.active for r in runs):
            active = [i for i, r in enumerate(runs) if r.active]
            # All adapters share batch_size and the data, so their accumulation groups line up step by step.
            first = runs[active[0]].batch_in_epoch
            group = range(first, min(first + cfg.grad_accum, batch_count))
            step_loss = torch.zeros(count, device=accelerator.device)
            for b in group:
                per_adapter = [prefetch.get(plan_of(runs[i])[b]) for i in active]
                if b + 1 < batch_count:
                    for i in active:
                        prefetch.want(plan_of(runs[i])[b + 1])
                joined = concat_batches(per_adapter, pad_id)
                labels = joined.pop("labels")
                inputs = {k: v.to(accelerator.device, non_blocking=True) for k, v in joined.items()}
                sizes = [0] * count
                counts = [1] * count
                for i, batch in zip(active, per_adapter, strict=True):
                    sizes[i] = batch.tensors["input_ids"].shape[0]
                    own = batch.tensors["labels"]
                    counts[i] = max(1, int((own[:, 1:] != IGNORE).sum()) if own.dim() == 2 else own.shape[0])
                    runs[i].train_tokens += batch.real_tokens
                    tokens += batch.real_tokens
                row_owner = torch.repeat_interleave(torch.arange(count), torch.tensor(sizes))
                width = int(joined["input_ids"].shape[1])
                with joint.segments.use(sizes), forward_context(accelerator, cfg.precision), \
                        runtime.training_attention(width, accelerator.device):
                    losses = segment_losses(model, inputs, labels, row_owner,
                                            torch.tensor(counts, dtype=torch.float32).to(accelerator.device), fast)
                # Parameters of different adapters are disjoint: each gets exactly its own loss's gradient.
                losses = losses / len(group)
                accelerator.backward(losses.sum())
                step_loss += losses.detach().float()
            step += 1
            if cfg.max_grad_norm:
                joint.clip_grad_norms_(cfg.max_grad_norm)  # each adapter on its own, as the loop clips a run
            # Adapters that stopped early have no rows and zero gradients; AdamW's momentum may still move them,
            # which changes nothing kept: they are not evaluated again and end on their best state.
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for i in active:
                run = runs[i]
                run.step = step
                run.batch_in_epoch = group.stop
                if run.batch_in_epoch >= batch_count:
                    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
            for i in active:
                if step % eval_every == 0 or step == n_steps:
                    run_eval(i)
            if on_step is not None:
                on_step(step, step_loss[active].mean())
    finally:
        compiled.off()  # evaluations and later runs use the blocks' own forwards
    prefetch.close()
    for i, run in enumerate(runs):
        if run.last_eval_step != run.step and not run.stopped_early:
            run_eval(i)
        if run.best_state is not None:
            joint.load_peft_state(i, run.best_state)
    return ConcurrentResult(runs, n_steps, time.perf_counter() - started, tokens)
