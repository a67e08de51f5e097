"""Process-wide compute settings: OpenMP waiting, CPU thread count and numeric precision.

One place decides these for every compute command (CLI, trainer, sweep, server), so they agree.

**Why torch's default threads collapsed on a shared machine.** torch's CPU kernels run on OpenMP (GNU libgomp
in the pip wheels). Between parallel regions libgomp's idle workers *spin* (busy-wait) for a long while
before sleeping, and every parallel region ends at a barrier that waits for all workers. With as many threads
as cores and one other CPU-bound process running, one worker is always descheduled: the others spin through
their time slices waiting for it at every barrier, thousands of times per training step — a 10× slowdown. A
training step is thousands of small parallel regions, so the spin cost dominates. Passive waiting
(``OMP_WAIT_POLICY=PASSIVE``: workers sleep at once; ``KMP_BLOCKTIME=0`` is the same for Intel's OpenMP)
removes it at no measurable cost when the machine is idle. OpenMP reads these variables once, when the library
is loaded, i.e. when torch is first imported — so :func:`prepare_openmp_env` runs from the package's
``__init__``, before anything imports torch, and only fills variables the user has not set.

**Precision.** ``auto`` picks bf16 where the hardware multiplies bf16 natively (CUDA with bf16 support; CPUs
with AMX-BF16 or AVX512-BF16, or an ARM CPU with the BF16 extension), else fp32. Under bf16 the frozen base
weights are stored in bf16 (half the memory, native-speed matmuls) while trainable parameters and the optimizer
state stay fp32; forward passes run under bf16 autocast so fp32 trainables and bf16 activations meet.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_local.config import PRECISIONS
from adapterhub_local.errors import ConfigError

if TYPE_CHECKING:
    import torch

THREADS_ENV = "ADAPTERHUB_THREADS"
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""OpenMP settings that stop idle workers spinning (see the module docstring)."""
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags of x86 CPUs with native bf16 matmul (AMX tiles, AVX512 dot products)."""
ARM_BF16_FLAGS = ("bf16",)
"""``/proc/cpuinfo`` features of ARM CPUs with the BF16 extension (BFDOT/BFMMLA)."""

_requested: int | None = None


def prepare_openmp_env() -> bool:
    """Fill in passive OpenMP waiting unless the user set those variables; False when it is too late.

    Call before torch is imported (the package ``__init__`` does); once torch is loaded OpenMP has read its
    environment and changing it does nothing.
    """
    if "torch" in sys.modules:
        return all(os.environ.get(k) is not None for k in OPENMP_ENV)
    for key, value in OPENMP_ENV.items():
        os.environ.setdefault(key, value)
    return True


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota when one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def default_threads() -> int:
    """torch's own choice (physical cores), but never more threads than CPUs this process may use."""
    import torch

    return max(1, min(torch.get_num_threads(), available_cpus()))


def _from_env() -> int | None:
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError([f"${THREADS_ENV}={raw!r} is not an integer"],
                          f"set {THREADS_ENV} to a thread count such as 2, or unset it", what="environment") from None


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count from ``threads`` or ``$ADAPTERHUB_THREADS``; return the count in use.

    With neither, the count is :func:`default_threads` (no more threads than usable CPUs). An explicit count
    is remembered (:func:`requested_threads`) so a recipe's own ``num_threads`` does not override it.
    """
    global _requested
    import torch

    if threads is None:
        threads = _from_env()
    if threads is not None:
        if threads < 1:
            raise ConfigError([f"--threads must be at least 1 (got {threads})"], "pass a positive thread count",
                              what="threads")
        _requested = threads
    else:
        threads = default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def requested_threads() -> int | None:
    """The count set explicitly (``--threads``/``$ADAPTERHUB_THREADS``) in this process, if any."""
    return _requested if _requested is not None else _from_env()


def configure_recipe_threads(recipe_threads: int | None) -> int:
    """Threads for a job: an explicit ``--threads``/env count wins over the recipe's ``num_threads``."""
    return configure_threads(requested_threads() or recipe_threads)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX-BF16, AVX512-BF16, ARM BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in CPU_BF16_FLAGS + ARM_BF16_FLAGS)


def resolve_precision(precision: str, device: str | None = None) -> str:
    """``auto`` → ``bf16`` where bf16 is native on ``device`` (default: CUDA if present, else CPU), else
    ``fp32``; explicit choices pass through (after checking they are known)."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError([f"unknown precision {precision!r}"], f"use one of {', '.join(PRECISIONS)}",
                          what="precision")
    if precision != "auto":
        return precision
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def base_dtype(precision: str, device: str | None = None) -> torch.dtype:
    """dtype for frozen base weights: bf16 under bf16, else fp32 (fp16 stays an autocast-only mode)."""
    import torch

    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32


def autocast(precision: str, device: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """The forward-pass context for ``precision``: bf16/fp16 autocast, or nothing for fp32."""
    import torch

    resolved = resolve_precision(precision, device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if resolved == "fp32":
        return contextlib.nullcontext()
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


SHORT_ATTENTION_WIDTH = 128
"""Widest batch for which CPU training avoids torch's flash attention kernel, whose backward is slow at short
widths: padded batches use the plain ("math") scaled-dot-product attention (8 × 9 heads × 100 positions: 37 vs
79 ms forward + backward), padding-free rows :func:`~adapterhub_local.segment_attention.grouped_causal_attention`
(faster again); past ~200 positions the flash kernel wins."""


def training_attention(width: int, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The attention kernel for a training forward of ``width`` positions on ``device``: on CPU and short
    widths the math kernel (see :data:`SHORT_ATTENTION_WIDTH`), else torch's own choice."""
    import torch

    if torch.device(device).type != "cpu" or width > SHORT_ATTENTION_WIDTH:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def upcast_trainable(model: torch.nn.Module) -> int:
    """Keep every trainable parameter in fp32 (master weights and optimizer state); returns how many moved."""
    import torch

    moved = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            moved += 1
    return moved
