"""Multi-process training: what the loop and the runner need to know about the other processes.

Launch: ``accelerate launch --multi_gpu --num_processes N -m adapterhub_local train RECIPE`` (or
``torchrun --nproc-per-node N -m adapterhub_local train RECIPE``): the same recipe and command, N processes, one
registered adapter. Without GPUs the processes run on the CPU and talk over gloo. (``accelerate launch --cpu
--num_processes N`` goes through MPI and, without ``mpirun``, starts a single process; it is refused here rather
than silently training alone.) Accelerate sets up the process group (:func:`current`, with a timeout) and wraps
the model in DDP (``train/loop.py``).

Definitions that make N processes give the adapter one process gives (within float rounding, dropout off; tested
with 2 gloo processes through the real command in ``tests/train/test_distributed.py``):

* The **global batch is the recipe's** — ``batch_size × grad_accum`` examples per optimizer step whatever N is;
  the data order is the one-process order (from the seed). Each micro-batch of ``batch_size`` rows is split
  across the processes, row ``i`` to process ``i mod N`` (:meth:`Processes.shard`), so the step count, the
  schedule and the checkpoints do not depend on N (a run can even resume under another N).
* **The loss is the one-process loss**: a micro-batch's loss is the mean over its labelled units (tokens whose
  next token is a target, or rows for a classifier). A process holding ``m`` of the micro-batch's ``M`` units
  scales its own mean loss by ``N·m/M`` (:attr:`Shard.share`), so DDP's gradient average equals the gradient
  of the one-process mean exactly, however unequal the shards. ``M`` is counted on the host from the plan, so
  no process has to ask the others. A process whose share of a micro-batch is empty runs a stand-in row with
  share 0 (DDP's all-reduce needs every process's backward).
* Gradients are all-reduced once per optimizer step (``no_sync`` on the other micro-batches of the group);
  clipping and the optimizer then see the same gradients on every process.
* Every process seeds identically (the same LoRA initialisation), and DDP broadcasts rank 0's parameters when
  it wraps the model.
* **Only the main process** evaluates, keeps the best checkpoint, writes checkpoints and logs, saves and
  registers; the others take the early-stopping decision from it (:meth:`Processes.main_says`) and return when
  training ends. A collective that fails (a process died, or hung past the timeout) raises
  :class:`~adapterhub_local.errors.DistributedError` (:meth:`Processes.guard`); registration happens only after
  training ends on every process, so a failed run registers nothing.

**FSDP** (bases that do not fit one device): ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N
-m adapterhub_local train RECIPE`` shards the base's blocks and their LoRA tensors across the processes
(``sharding.py``, PyTorch's FSDP2; gloo on CPUs). The definitions above hold unchanged (FSDP averages gradients as
DDP does); what differs: every forward is a collective, so **every process** runs every evaluation (each on the
whole validation/test set, the same numbers everywhere; only the main one logs and decides), every trainable-state
save (best, checkpoint, final adapter) **gathers the full tensors** on every process and the main one writes them —
the same files as one process writes, so a run resumes under any N and either strategy (tested: cut under 1 and
resumed under 2, DDP and FSDP; cut under 2 FSDP processes and resumed under 1). Each process still loads the base
in full into host memory before sharding it (a 1/N share after that; on GPUs each block moves to the device as it
is sharded, so no device holds the whole model). Only LoRA is trained this way
(:func:`sharding.check_supported`), and an interrupt (Ctrl-C) keeps the last periodic checkpoint (saving one is a
collective the other processes may not reach). Other ``--fsdp_*`` settings of Accelerate are not read.

Dropout — LoRA's and the base model's own (BERT-style encoders train with 0.1) — draws
different masks in N processes than in one: the same distribution, not the same numbers, so the equality above
holds with dropout off and in distribution with it on. Resuming restores the main process's RNG state on every
process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.errors import ConfigError, DistributedError, UnsupportedError
from adapterhub_local.train.tasks import IGNORE, Example

TIMEOUT_ENV = "ADAPTERHUB_DIST_TIMEOUT"
"""Seconds a process waits for the others in one collective before giving up (default 1800, torch's own). The
main process evaluates while the others wait, so this must exceed the longest periodic evaluation."""
DEFAULT_TIMEOUT_S = 1800.0
_WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_TEXT_BYTES = 4096



@dataclass(frozen=True)
class Shard:
    """This process's rows of one micro-batch and the factor for its mean loss (see the module docstring)."""

    rows: list[int]
    share: float


@dataclass(frozen=True)
class Processes:
    """The training processes as one process sees them; the default is a single process (every method a no-op)."""

    world_size: int = 1
    rank: int = 0
    device: str = "cpu"
    timeout_s: float = DEFAULT_TIMEOUT_S
    fsdp: bool = False
    """The model is sharded across the processes (``sharding.py``) rather than replicated (DDP)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: Sequence[int], units: Sequence[int]) -> Shard:
        """This process's rows of a micro-batch (rows ``rank, rank + N, …`` of it; all of them when alone) and
        its loss share ``N·m/M`` (``m`` of the micro-batch's ``M`` loss units, :func:`loss_units`)."""
        if self.world_size == 1:
            return Shard(list(rows), 1.0)
        mine = list(rows[self.rank :: self.world_size])
        total = sum(units[i] for i in rows)
        own = sum(units[i] for i in mine)
        if own == 0:  # nothing of this micro-batch here: a stand-in row that contributes a zero gradient
            stand_in = next((i for i in rows if units[i] > 0), rows[0])
            return Shard([stand_in], 0.0)
        return Shard(mine, self.world_size * own / total)

    def average(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (every process must call it)."""
        if self.world_size == 1:
            return value
        total = value.detach().to(self.device, torch.float64).clone()
        with self.guard():
            torch.distributed.all_reduce(total)
        return total / self.world_size

    def main_says(self, flag: bool) -> bool:
        """The main process's ``flag``, on every process (every process must call it)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        with self.guard():
            torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def main_path(self, path: Path | None) -> Path:
        """The main process's ``path`` (the run directory), on every process; bytes, not pickle."""
        if self.world_size == 1:
            assert path is not None
            return path
        buffer = torch.zeros(_TEXT_BYTES, dtype=torch.uint8, device=self.device)
        if self.is_main:
            assert path is not None
            raw = str(path).encode("utf-8")
            if len(raw) >= _TEXT_BYTES:
                raise ConfigError([f"the run directory path is {len(raw)} bytes long"],
                                  f"use a run directory path shorter than {_TEXT_BYTES} bytes", what="run directory")
            buffer[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        with self.guard():
            torch.distributed.broadcast(buffer, src=0)
        raw = bytes(buffer.cpu().tolist())
        return Path(raw.rstrip(b"\0").decode("utf-8"))

    def barrier(self) -> None:
        if self.world_size > 1:
            with self.guard():
                torch.distributed.barrier()

    def finish(self) -> None:
        """End of a successful run, on every process: wait for the others (the main process registers and checks
        while they wait), then destroy the process group. A process that exits with the group alive leaves gloo's
        worker threads holding tensors during interpreter shutdown, which aborts it now and then (SIGABRT,
        "terminate called without an active exception"; pytorch/pytorch#190489). Not called on a failure: the
        launcher stops the other processes then, and a destroy that waits on a dead peer would hang."""
        if self.world_size == 1:
            return
        self.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a failed collective (another process died, or hung past the timeout) into a
        :class:`DistributedError` that says what happened and what to do."""
        try:
            yield
        except RuntimeError as exc:
            if self.world_size == 1 or not _is_collective_failure(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"process {self.rank} of {self.world_size} lost the other training processes ({first})",
                "another process failed (its own error is printed above) or hung longer than "
                f"{self.timeout_s:g} s (${TIMEOUT_ENV}); nothing was registered — fix the cause and continue from "
                "the last checkpoint with --resume") from exc


SINGLE = Processes()


def _is_collective_failure(exc: RuntimeError) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset",
                                         "Timed out", "timed out"))


def loss_units(examples: Sequence[Example], shifted: bool = True) -> list[int]:
    """Each example's loss units: 1 for a classifier row; for a causal LM the labelled tokens that are some
    position's next token (``labels[1:]``, as HF shifts them), or every labelled token when ``shifted`` is False
    (soft prompts put virtual tokens in front, so the first label has a predecessor)."""
    out = []
    for example in examples:
        labels = example.labels
        if isinstance(labels, int):
            out.append(1)
        else:
            out.append(sum(1 for t in (labels[1:] if shifted else labels) if t != IGNORE))
    return out


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError([f"${TIMEOUT_ENV} is {raw!r}"], f"set ${TIMEOUT_ENV} to a positive number of seconds",
                          what="environment")
    return value


def _env_int(names: Sequence[str]) -> int:
    for name in names:
        raw = os.environ.get(name)
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise ConfigError([f"${name} is {raw!r}, not a whole number"], "start the processes with "
                                  "`accelerate launch` or `torchrun`", what="environment") from None
    return 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def from_env() -> Processes:
    """The processes this one was started among (by ``accelerate launch`` / ``torchrun``), with the process group
    set up through Accelerate (gloo on CPU, NCCL on GPUs) and the ``$ADAPTERHUB_DIST_TIMEOUT`` timeout."""
    world = _env_int(_WORLD_ENV)
    if world <= 1:
        if _flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR"):
            raise ConfigError(
                ["`accelerate launch --cpu --num_processes N` started a single process (Accelerate's multi-CPU "
                 "launch goes through mpirun)"],
                "on one machine run `accelerate launch --multi_gpu --num_processes N -m adapterhub_local train "
                "RECIPE` (without GPUs this gives N CPU processes over gloo) or `torchrun --nproc-per-node N -m "
                "adapterhub_local train RECIPE`", what="launch")
        return SINGLE
    fsdp = _flag("ACCELERATE_USE_FSDP")
    if fsdp and os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise UnsupportedError(f"FSDP version {os.environ.get('FSDP_VERSION', '1')!r} is not supported for training "
                               "(FSDP1 is deprecated in PyTorch)", "add --fsdp_version 2 to `accelerate launch "
                               "--use_fsdp` (or fsdp_version: 2 in its config file)")
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise UnsupportedError("DeepSpeed is not supported for training", "train with DDP (`accelerate launch "
                               "--multi_gpu`)")
    if fsdp:
        # Accelerate's default asks transformers to load the weights on process 0 only and leaves every other
        # process's newly initialised tensors (a classifier head) on the meta device for an FSDP1 broadcast; here
        # each process loads the base and initialises new tensors from the shared seed, and FSDP2 shards them.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    from accelerate import PartialState

    limit = timeout_s()
    state: Any = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=limit))
    return Processes(int(state.num_processes), int(state.process_index), str(state.device), limit, fsdp)


@functools.lru_cache(maxsize=1)
def current() -> Processes:
    """:func:`from_env`, once per process (the process group lives as long as the process)."""
    return from_env()


def require_single(what: str) -> None:
    """Refuse ``what`` (a command that does not split its work) when started as one of several processes."""
    world = _env_int(_WORLD_ENV)
    if world > 1:
        raise UnsupportedError(f"{what} runs as one process, but this is one of {world}",
                               f"run {what} without accelerate launch / torchrun")
