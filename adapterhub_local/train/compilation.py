"""``train.compile``: the base's repeated blocks (decoder or encoder layers) under ``torch.compile`` while training.

Why: on the project CPU a bf16 LoRA step of the SmolLM2-135M shape spends about a third of its time outside the
matrix multiplications, in hundreds of small element-wise kernels per layer (RMSNorm's casts and powers, rotary
embeddings, SiLU gating, residual adds, mask handling) — each a separate pass over memory and a separate
OpenMP region. Inductor fuses them into a few loops per layer: 1.5–1.6× the eager step there
(``benchmarks/train_throughput.py``, side ``ours_bf16_compiled``; on the real E2E data 480 vs 335 tokens/s).

What is compiled: each block's ``forward`` separately, ``dynamic=True`` (one graph for every sequence length
instead of one per batch width). The blocks are identical, so Inductor's on-disk graph cache turns 30 compiles
into one: the first step costs about 40 s on a cold cache and under 10 s on a warm one on the project machine.
The LM head, the loss and the optimizer stay eager. Compilation is switched off around evaluation (which runs
the same modules without gradients, or generates with a cache) and on again after, so evaluation needs no graphs
of its own and is unchanged.

When (``train.compile``):

* ``true`` — always in one process (an error names the missing piece: a C++ compiler for Inductor's CPU kernels);
  refused in multi-process runs (DDP/FSDP), where compiled blocks have not been tested;
* ``false`` — never;
* ``auto`` (default) — where it pays on the evidence above: a CPU run in one process, of at least
  :data:`AUTO_MIN_STEPS` optimizer steps, on a base of at least :data:`AUTO_MIN_PARAMS` parameters (smaller
  bases measured no gain), with a C++ compiler present, on Linux. GPUs stay eager under ``auto``: compiled
  training has not been measured on one here.

Results: a compiled step computes the same function with different rounding (fused kernels) and, with LoRA
dropout, draws its masks through Inductor's own random stream (seeded from torch's, so the same seed still gives
the same run and ``--resume`` continues it exactly) — the adapter differs from an eager run's at the noise level.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_local.errors import ConfigError

AUTO_MIN_STEPS = 200
"""Below this many optimizer steps a cold compile (~40 s) is not repaid on the project CPU (~0.3 s/step saved)."""
AUTO_MIN_PARAMS = 100_000_000
"""Below this size fusion did not pay: all-MiniLM-L6-v2 (23M, 6 encoder layers, batch 32) trained no faster compiled
than eager on the project CPU (1,710 vs 1,790 tokens/s after the compile); SmolLM2-135M 1.5× faster."""


@dataclass(frozen=True)
class CompileDecision:
    """Whether training compiles, and why (for the run's log line)."""

    enabled: bool
    reason: str


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use for CPU kernels (``$CXX`` or ``g++``/``c++``/``clang++``), or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        found = shutil.which(name)
        if found:
            return found
    return None


def decide(setting: str, *, device: torch.device, steps: int, base_params: int, processes: int) -> CompileDecision:
    """Apply the ``train.compile`` rules of the module docstring; ``true`` without a compiler is an error."""
    if setting == "false":
        return CompileDecision(False, "train.compile is false")
    compiler = cxx_compiler() if device.type == "cpu" else "not needed"
    if setting == "true":
        if compiler is None:
            raise ConfigError(["train.compile is true but no C++ compiler was found (Inductor needs one for CPU "
                               "kernels)"], "install one (e.g. `apt install g++`, or set $CXX) or set "
                              "train.compile: false", what="train")
        if processes > 1:
            raise ConfigError([f"train.compile is true in a run of {processes} processes: compiled blocks under "
                               "DDP/FSDP hooks are not tested here"], "set train.compile: auto (eager with several "
                              "processes) or false", what="train")
        return CompileDecision(True, "train.compile is true")
    reasons = []
    if device.type != "cpu":
        reasons.append(f"device {device.type} (auto compiles on CPUs only)")
    if processes > 1:
        reasons.append(f"{processes} processes")
    if steps < AUTO_MIN_STEPS:
        reasons.append(f"{steps} steps < {AUTO_MIN_STEPS}")
    if base_params < AUTO_MIN_PARAMS:
        reasons.append(f"{base_params / 1e6:.1f}M parameters < {AUTO_MIN_PARAMS / 1e6:.0f}M")
    if compiler is None:
        reasons.append("no C++ compiler")
    if not sys.platform.startswith("linux"):
        reasons.append(f"platform {sys.platform}")
    if reasons:
        return CompileDecision(False, "train.compile auto: eager (" + "; ".join(reasons) + ")")
    return CompileDecision(True, f"train.compile auto: {steps} steps on a {base_params / 1e6:.0f}M-parameter base "
                                 "on CPU")


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the longest ``ModuleList`` whose members are all of one class (at least
    two of them) — ``model.layers`` of a Llama, ``encoder.layer`` of a BERT. Empty when there is none."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len(module) > len(best):
            members = list(module)
            if len({type(m) for m in members}) == 1:
                best = members
    return best


class CompiledBlocks:
    """Compiled ``forward`` functions of a model's blocks, put in place for training steps (:meth:`on`) and
    taken out for evaluation (:meth:`off`, :meth:`paused`); compiled once, reused across switches. With no
    blocks (training stays eager) every switch does nothing."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self._blocks = blocks
        self._compiled: list[Callable[..., Any]] = [torch.compile(b.forward, dynamic=True) for b in blocks]
        self._active = False

    def __len__(self) -> int:
        return len(self._blocks)

    def on(self) -> None:
        for block, compiled in zip(self._blocks, self._compiled, strict=True):
            block.forward = compiled  # an instance attribute shadows the class's forward
        self._active = True

    def off(self) -> None:
        if not self._active:
            return
        for block in self._blocks:
            if "forward" in vars(block):
                delattr(block, "forward")  # back to the class's own forward
        self._active = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The class's own (eager) forwards inside the block, the previous state after it."""
        was_active = self._active
        self.off()
        try:
            yield
        finally:
            if was_active:
                self.on()


def compile_for_training(model: torch.nn.Module, setting: str, *, device: torch.device, steps: int,
                         processes: int, log: Callable[[str], Any]) -> CompiledBlocks:
    """Decide (``train.compile``) and return the model's blocks ready to switch on — none when training stays
    eager (or the model has no repeated blocks); logs the decision."""
    base_params = sum(p.numel() for p in model.parameters())
    decision = decide(setting, device=device, steps=steps, base_params=base_params, processes=processes)
    if not decision.enabled:
        if setting != "auto" or steps >= AUTO_MIN_STEPS:
            log(decision.reason)
        return CompiledBlocks([])
    blocks = repeated_blocks(model)
    if not blocks:
        log(f"{decision.reason}, but the model has no repeated blocks to compile: eager")
        return CompiledBlocks([])
    log(f"{decision.reason}: compiling its {len(blocks)} {type(blocks[0]).__name__} blocks (the first step "
        "takes longer)")
    # Every block of every model shares its class's forward code, and dynamo caches compiled graphs per code
    # object: each run adds its own (two per run: the first block's input needs no gradient, the others' do). A
    # process that trains run after run (a sequential sweep) reached dynamo's recompile limit (8) at its fifth
    # point and trained the rest eagerly, silently (~255 instead of ~400 tokens/s). Each run starts from an empty
    # dynamo cache instead; Inductor's on-disk cache keeps the recompile to seconds.
    torch._dynamo.reset()
    return CompiledBlocks(blocks)
