"""The training loop, written out: Accelerate for the device, bf16 autocast over a bf16 frozen base with fp32
trainable parameters and optimizer state (``precision: auto`` where bf16 matmul is native, see ``runtime.py``),
AdamW, linear warm-up then linear decay, gradient accumulation, epochs or max steps, periodic evaluation,
best-checkpoint keeping, early stopping, and checkpoints that ``--resume`` continues from exactly (same seed → same
adapter). The optimizer, schedule and early-stopping pieces are shared with the concurrent sweep
(``sweep/concurrent.py``).

Speed (profiled on the SmolLM2-135M shape, LoRA q, v, batch 8, lengths 40–100, bf16, 2 CPU threads): a causal
LM's loss comes from the LM head on labelled positions only, cross entropy in fp32 a few rows at a time, summed in
fp32 (``lm_loss.py``, ``chunked_ce.py``; the model's own loss upcast all ``batch × width × 49,152`` logits to fp32 —
about a fifth of the step); short batches use the math attention kernel on CPU, whose backward is twice as fast
there as the flash kernel's (``runtime.training_attention``); under autocast PEFT's fp32 round trip of LoRA inputs
is skipped (bit-identical); a causal LM's micro-batch runs padding-free, its sequences end to end in one row
(``padding_free.py``: a quarter fewer positions at lengths 40–100); the next batch is collated on a worker thread;
losses stay on the device until a log line.

Exact resumption rests on three things saved at an optimizer-step boundary: the trainable tensors and
optimizer/scheduler state, the torch RNG state (LoRA dropout draws from it), and the position in the
data order, which comes from a per-epoch generator seeded by ``seed`` and the epoch number, not from
the global RNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from adapterhub_local import runtime
from adapterhub_local.config import TrainConfig
from adapterhub_local.errors import ConfigError
from adapterhub_local.train import lm_loss, padding_free, sharding
from adapterhub_local.train.compilation import compile_for_training
from adapterhub_local.train.distributed import SINGLE, Processes, loss_units
from adapterhub_local.train.methods import load_trainable_state, trainable_state
from adapterhub_local.train.tasks import Batch, Example

CHECKPOINT = "checkpoint"
BEST = "best"
METRICS_LOG = "metrics.jsonl"
Evaluate = Callable[[torch.nn.Module], dict[str, Any]]


@dataclass
class LoopState:
    """Counters saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1
    last_eval: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopResult:
    state: LoopState
    total_steps: int
    metric: str

    @property
    def tokens_per_s(self) -> float:
        return self.state.train_tokens / self.state.train_seconds if self.state.train_seconds > 0 else 0.0


def make_accelerator(precision: str) -> Any:
    """Accelerate for the device (and fp16's loss scaling). bf16 needs no loss scaling, so it is plain
    autocast (:func:`forward_context`); keeping Accelerate's process-wide state at ``no`` for it lets runs of
    different precisions share one process."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    resolved = runtime.resolve_precision(precision)
    from accelerate.utils import DistributedDataParallelKwargs

    # Multi-process (distributed.py): the models' buffers are constants, so no broadcast of them in every forward;
    # a trainable tensor may take no part in the loss (LoRA on a BERT pooler the classifier does not read): DDP
    # then leaves its gradient None, as one process does, instead of waiting for it.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=True)
    return Accelerator(cpu=not cuda, mixed_precision="fp16" if resolved == "fp16" else "no", kwargs_handlers=[ddp])


def forward_context(accelerator: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Where forward passes run: bf16 autocast (fp32 trainables meet bf16 base weights), Accelerate's fp16
    autocast, or nothing for fp32."""
    if runtime.resolve_precision(precision) == "fp16":
        context: contextlib.AbstractContextManager[Any] = accelerator.autocast()
        return context
    return runtime.autocast(precision)


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig, n_steps: int) -> tuple[Any, Any]:
    """AdamW with weight decay on matrices only, and the linear warm-up/decay schedule over ``n_steps``."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, foreach=True,
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * n_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, n_steps))


def training_loss(model: torch.nn.Module, batch: Batch, accelerator: Any, precision: str,
                  fast: bool) -> torch.Tensor:
    """One micro-batch's forward and loss: ``model(**batch).loss``, computed the fast way where ``fast``
    (:mod:`.lm_loss`: the LM head and cross entropy on labelled positions only, and the short-width attention
    kernel on CPU) — the same loss up to bf16 rounding."""
    device = accelerator.device
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.tensors.items()}
    labels = batch.tensors.get("labels")
    width = padding_free.padded_width(batch.tensors)
    with forward_context(accelerator, precision), runtime.training_attention(width, device):
        if fast and labels is not None and labels.dim() == 2:
            return lm_loss.causal_lm_loss(model, inputs, lm_loss.label_targets(labels).to(device))
        loss: torch.Tensor = model(**inputs).loss
        return loss


def padding_free_decision(model: torch.nn.Module, setting: str, fast_loss: bool, processes: int) -> bool:
    """Whether the loop lays micro-batches out padding-free (``train.padding_free``, :mod:`.padding_free`)."""
    if setting == "false":
        return False
    reason = padding_free.unsupported_reason(model, fast_loss, processes)
    if reason is not None and setting == "true":
        raise ConfigError([f"train.padding_free is true, but padding-free batches cannot train this run: {reason}"],
                          "set train.padding_free to auto (padded batches where it does not apply) or false")
    return reason is None


class EvalTrack(Protocol):
    """Best-evaluation and early-stopping counters (the loop's ``LoopState``, the sweep's ``AdapterRun``)."""

    step: int
    best_metric: float | None
    best_step: int | None
    bad_evals: int
    stopped_early: bool


def note_evaluation(track: EvalTrack, value: float, greater_is_better: bool, patience: int | None) -> bool:
    """Record an evaluation's metric: a new best resets the patience count; returns whether it is a new best.

    Sets ``track.stopped_early`` once ``patience`` evaluations in a row did not improve."""
    best = _improved(value, track.best_metric, greater_is_better)
    if best:
        track.best_metric, track.best_step, track.bad_evals = value, track.step, 0
    else:
        track.bad_evals += 1
    track.stopped_early = patience is not None and track.bad_evals >= patience
    return best


class Prefetcher:
    """Collates the next batch on a worker thread while the current one trains (torch ops release the GIL,
    so list-to-tensor work overlaps the forward/backward instead of sitting between steps)."""

    def __init__(self, collate: Callable[[Sequence[Example]], Batch], examples: Sequence[Example]) -> None:
        self._collate = collate
        self._examples = examples
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        self._pending: dict[tuple[int, ...], Future[Batch]] = {}

    def want(self, indices: Sequence[int]) -> None:
        """Start collating ``indices`` now, for a later :meth:`get`."""
        key = tuple(indices)
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._collate, [self._examples[i] for i in key])

    def get(self, indices: Sequence[int]) -> Batch:
        self.want(indices)
        return self._pending.pop(tuple(indices)).result()

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: 0 → 1 over ``warmup`` steps, then linearly down to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """The epoch's batches of example indices. With ``group_by_length``, a shuffled window of 50 batches is
    sorted by length before cutting, so a batch pads little, and the batches are shuffled again: random,
    but far less padding (the same idea as Hugging Face's ``group_by_length``)."""
    order = epoch_order(len(lengths), seed, epoch)
    if group_by_length:
        window = 50 * batch_size
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start : start + window], key=lambda j: -lengths[j])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        batches = [batches[i] for i in shuffle.tolist()]
    return batches


def steps_per_epoch(n_examples: int, cfg: TrainConfig) -> int:
    return math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_examples, cfg)))


def _log(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / METRICS_LOG).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def _save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: LoopState,
                     rng: torch.Tensor, cuda_rng: list[torch.Tensor] | None, processes: Processes = SINGLE) -> None:
    """Write a checkpoint from the main process. Under FSDP every process must call this: the tensors are gathered
    from the shards first (the files are the one-process files, whatever N)."""
    if not (processes.is_main or processes.fsdp):
        return
    tensors = trainable_state(model)
    optimizer_state = sharding.full_optimizer_state(optimizer.state_dict())
    if not processes.is_main:
        return
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng,
                "cuda_rng": cuda_rng}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2, default=float))
    final = run_dir / CHECKPOINT
    old = run_dir / f"{CHECKPOINT}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
    directory = run_dir / CHECKPOINT
    if not (directory / "state.json").exists():
        raise ConfigError([f"{run_dir} has no checkpoint to resume from"], "start the run without --resume",
                          what="resume")
    load_trainable_state(model, load_file(str(directory / "trainable.safetensors")))
    # weights_only: plain tensors and numbers only, never arbitrary pickled objects.
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    sharding.reshard_optimizer_state(optimizer)  # one-process layout → this process's shards under FSDP
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    if saved.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return LoopState(**json.loads((directory / "state.json").read_text()))


def load_best(run_dir: Path, model: torch.nn.Module) -> bool:
    """Put the best evaluation's trainable tensors back into ``model``; False when none was kept."""
    path = run_dir / BEST / "trainable.safetensors"
    if not path.exists():
        return False
    load_trainable_state(model, load_file(str(path)))
    return True


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if greater_is_better else value < best


def train_loop(
    model: torch.nn.Module,
    examples: Sequence[Example],
    collate: Callable[[Sequence[Example]], Batch],
    cfg: TrainConfig,
    run_dir: Path,
    evaluate: Evaluate,
    metric: str,
    greater_is_better: bool,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    processes: Processes = SINGLE,
) -> LoopResult:
    """Train ``model``'s trainable parameters in place; returns counters and the best evaluation.

    The hot path does no host synchronisation: losses stay tensors until a log line or the progress bar
    (refreshed at log time) reads them, the next batch is collated on a worker thread meanwhile, and gradient
    synchronisation (multi-process runs) happens on the last micro-batch of an accumulation group only.

    With several ``processes`` each takes its shard of every micro-batch and only the main one evaluates, saves
    and logs (``distributed.py``); under FSDP all of them evaluate and gather what is saved, and the main one
    writes.
    """
    from tqdm.auto import tqdm

    accelerator = make_accelerator(cfg.precision)
    fsdp = processes.fsdp
    # Trainable parameters (and so the optimizer state) stay fp32 whatever the base weights' dtype.
    runtime.upcast_trainable(model)
    if fsdp:  # sharded in place before the optimizer is made: it steps this process's shards
        sharding.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_steps = total_steps(len(examples), cfg)
    optimizer, scheduler = make_optimizer(params, cfg, n_steps)
    inner = model  # the model itself; `model` becomes its DDP wrapper with several processes (not under FSDP)
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    state = _load_checkpoint(run_dir, inner, optimizer, scheduler) if resume else LoopState()
    eval_every = cfg.eval_every or steps_per_epoch(len(examples), cfg)
    batch_count = math.ceil(len(examples) / cfg.batch_size)
    lengths = [len(e.input_ids) for e in examples]
    prompt_learning = bool(getattr(getattr(inner, "active_peft_config", None), "is_prompt_learning", False))
    units = loss_units(examples, shifted=not prompt_learning) if processes.world_size > 1 else []  # unused alone
    boundary_rng = torch.get_rng_state()
    boundary_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    bar = tqdm(total=n_steps, initial=state.step, disable=not progress or not processes.is_main, desc="train",
               dynamic_ncols=True)
    # The LM head on labelled positions only (lm_loss.py); DDP needs the wrapped model's own forward.
    fast_loss = processes.world_size == 1 and lm_loss.supports(model, {"labels": torch.zeros(1, 1)})
    running_loss = torch.zeros((), device=accelerator.device)
    running_n = 0
    unpadded = padding_free_decision(inner, cfg.padding_free, fast_loss, processes.world_size)
    prefetch = Prefetcher(padding_free.collating(collate) if unpadded else collate, examples)
    # Under autocast PEFT's cast of each LoRA input to the fp32 adapter dtype is undone by the matmul's own cast
    # to bf16 — two copies of every adapted activation, forward and backward, for bit-identical results.
    casting = contextlib.ExitStack()
    if runtime.resolve_precision(cfg.precision) in ("bf16", "fp16") and hasattr(inner, "peft_config"):
        from peft.helpers import disable_input_dtype_casting

        casting.enter_context(disable_input_dtype_casting(inner))
    # train.compile: the blocks' compiled forwards serve training steps only (compilation.py).
    compiled = compile_for_training(inner, cfg.compile, device=accelerator.device, steps=n_steps,
                                    processes=accelerator.num_processes,
                                    log=bar.write if processes.is_main else lambda _: None)

    def run_eval() -> bool:
        """Evaluate, keep the best, decide on early stopping; True = stop. The main process evaluates (under FSDP
        every process does: its forwards are collectives); the others take its decisions."""
        if not (processes.is_main or fsdp):
            state.last_eval_step = state.step
            return processes.main_says(False)
        model.eval()
        with compiled.paused(), torch.no_grad(), forward_context(accelerator, cfg.precision):
            result = evaluate(inner)
        model.train()
        if not processes.is_main:  # FSDP: gather the best tensors if the main process keeps them
            state.last_eval_step = state.step
            if processes.main_says(False):
                trainable_state(inner)
            return processes.main_says(False)
        value = float(result.get(metric, float("nan")))
        state.last_eval_step, state.last_eval = state.step, result
        is_best = note_evaluation(state, value, greater_is_better, cfg.early_stopping_patience)
        if fsdp:
            processes.main_says(is_best)
        if is_best:
            best = run_dir / BEST
            best.mkdir(exist_ok=True)
            save_file(trainable_state(inner), str(best / "trainable.safetensors"))
        _log(run_dir, {"step": state.step, "epoch": state.epoch, "eval": result})
        bar.write(f"step {state.step}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, int | float)))
        return processes.main_says(state.stopped_early)

    model.train()
    compiled.on()
    try:
        while state.step < n_steps and not state.stopped_early:
            epoch = state.epoch
            epoch_plan = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
            # Leave the inner loop at the epoch boundary so the next epoch gets its own batch order.
            while state.epoch == epoch and state.batch_in_epoch < batch_count and state.step < n_steps:
                started = time.perf_counter()
                first = state.batch_in_epoch
                group = range(first, min(first + cfg.grad_accum, batch_count))
                step_loss = torch.zeros((), device=accelerator.device)
                step_tokens = 0
                for b in group:
                    shard = processes.shard(epoch_plan[b], units)  # the whole micro-batch in one process
                    batch = prefetch.get(shard.rows)
                    if b + 1 < batch_count:
                        prefetch.want(processes.shard(epoch_plan[b + 1], units).rows)
                    # Gradients are synchronised (multi-process) on the group's last micro-batch only.
                    sync = (contextlib.nullcontext() if b == group[-1]
                            else sharding.no_sync(model) if fsdp else accelerator.no_sync(model))
                    with sync:
                        loss = training_loss(model, batch, accelerator, cfg.precision, fast_loss) * shard.share
                        loss = loss / len(group)
                        accelerator.backward(loss)
                    step_loss += loss.detach().float()
                    step_tokens += sum(lengths[i] for i in epoch_plan[b])  # the whole micro-batch's
                if cfg.max_grad_norm and fsdp:  # the norm of the whole gradient, from the shards' (DTensor)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                elif cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch = group.stop
                state.train_tokens += step_tokens
                state.train_seconds += time.perf_counter() - started
                running_loss += step_loss
                running_n += 1
                if state.batch_in_epoch >= batch_count:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == n_steps:
                    # The only place the training loss leaves the device.
                    tokens_per_s = state.train_tokens / max(state.train_seconds, 1e-9)
                    mean_loss = float(processes.average(running_loss)) / running_n
                    bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                    if processes.is_main:
                        _log(run_dir, {"step": state.step, "epoch": state.epoch, "loss": mean_loss,
                                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s})
                    running_loss.zero_()
                    running_n = 0
                if state.step % eval_every == 0 or state.step == n_steps:
                    state.stopped_early = run_eval()
                boundary_rng = torch.get_rng_state()
                boundary_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
                if state.step % eval_every == 0 or state.step == n_steps or state.stopped_early:
                    _save_checkpoint(run_dir, inner, optimizer, scheduler, state, boundary_rng, boundary_cuda,
                                     processes)
                if on_step is not None and processes.is_main:
                    on_step(state.step)
                if state.stopped_early:
                    break
    except KeyboardInterrupt:
        # Keep the last completed step so --resume continues from it (gradients of a half-done
        # accumulation are discarded; the parameters did not move since that step).
        optimizer.zero_grad(set_to_none=True)
        if processes.is_main and not fsdp:  # under FSDP a save is a collective the others may not reach
            _save_checkpoint(run_dir, inner, optimizer, scheduler, state, boundary_rng, boundary_cuda)
        bar.close()
        raise
    finally:
        prefetch.close()
        casting.close()
        compiled.off()
    bar.close()
    if state.last_eval_step != state.step and not state.stopped_early:
        run_eval()
        _save_checkpoint(run_dir, inner, optimizer, scheduler, state, torch.get_rng_state(), None, processes)
    return LoopResult(state, n_steps, metric)
