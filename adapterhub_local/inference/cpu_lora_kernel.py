"""The CPU decode kernels — per-row LoRA (``kernels/bgmv.c``) and a decode step's attention
(``kernels/decode_attention.c``, called by :mod:`adapterhub_local.decode_attention`): build them once, call
them, or say why not.

At a decode step (one token per row) torch's bf16 ``bmm`` on a CPU calls one oneDNN matmul per batch entry, and
that per-entry overhead (about 3 µs each, plus ~25 µs per call, measured on the project machine) is most of
the cost of 32 distinct adapters: a rank-16 576→576 module took ~215 µs for its two ``bmm`` and the add, the
kernel ~70 µs with the same result bits (``benchmarks/serving.py`` has the end-to-end figures). The kernel
reads each row's operands once, accumulates in fp32 and rounds where torch's two ``bmm`` and the add round.

The shared library is compiled from the shipped C sources at first use with the system C compiler
(``cc -O3 -march=native``; no Python headers, about a second) into a per-user cache keyed by the sources,
the compiler and the CPU's feature flags, so a cache shared between different machines never loads code built
for another CPU. Where there is no compiler, the build fails, or ``ADAPTERHUB_CPU_KERNELS=off`` is set, callers
fall back to torch (:func:`available` is ``False``; the reason is in :func:`unavailable_reason`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from adapterhub_local.inference.suspension import Suspension

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "bgmv.c"
ATTENTION_SOURCE = SOURCE.with_name("decode_attention.c")
SOURCES = (SOURCE, ATTENTION_SOURCE)
HEADERS = (SOURCE.with_name("bf16.h"),)
SWITCH_ENV = "ADAPTERHUB_CPU_KERNELS"
"""``off`` (or ``0``/``false``/``no``) disables the kernel; torch's ``bmm`` is used instead."""
CACHE_ENV = "ADAPTERHUB_KERNEL_CACHE"
"""Where built kernels are kept (default ``$XDG_CACHE_HOME/adapterhub/kernels`` or ``~/.cache/adapterhub/kernels``)."""
MAX_RANK = 4096
"""The largest rank the kernel computes (its stack buffer); larger ranks use torch."""
DTYPES = {torch.bfloat16: "bgmv_add_bf16", torch.float32: "bgmv_add_f32"}
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])


class KernelError(RuntimeError):
    """The kernel refused its arguments (a rank past its limit or an index out of range): a bug in the caller."""


class _Library:
    """The loaded kernel (or why there is none), built on first use, once per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self._functions: dict[torch.dtype, ctypes._CFuncPtr] = {}  # type: ignore[name-defined]
        self.attention: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
        self.reason: str | None = None

    def functions(self) -> dict[torch.dtype, ctypes._CFuncPtr]:  # type: ignore[name-defined]
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True
        return self._functions

    def _load(self) -> None:
        if os.environ.get(SWITCH_ENV, "").strip().lower() in ("off", "0", "false", "no"):
            self.reason = f"disabled by {SWITCH_ENV}"
            return
        try:
            path = build()
            library = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            self.reason = f"could not build or load {', '.join(s.name for s in SOURCES)}: {error}"
            log.warning("CPU kernels unavailable (%s): per-row LoRA uses torch.bmm, decode attention torch's kernel",
                        self.reason)
            return
        for dtype, name in DTYPES.items():
            function = getattr(library, name)
            function.restype = ctypes.c_int
            function.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p] + [
                ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
            self._functions[dtype] = function
        attention = library.decode_attention_bf16
        attention.restype = ctypes.c_int
        attention.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        self.attention = attention


_LIBRARY = _Library()


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adapterhub" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (install gcc, or set CC)")


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a build for one CPU is never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _check_private(path: Path) -> None:
    """Refuse a cache entry another user could have written: loading a library runs its code."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise RuntimeError(f"{path} belongs to another user; point {CACHE_ENV} at a directory of your own")
    if info.st_mode & 0o022:
        raise RuntimeError(f"{path} is writable by others (mode {oct(info.st_mode & 0o777)}); "
                           f"`chmod go-w {path}` or point {CACHE_ENV} elsewhere")


def build() -> Path:
    """The kernels' shared library, compiled into :func:`cache_dir` unless these sources, compiler and CPU already
    have one there; concurrent builders each write a private file and rename it into place. A cache directory or
    library that another user owns or may write is refused (loading a library runs its code)."""
    compiler = _compiler()
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(directory)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = b"\0".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:20]
        target = directory / f"bgmv-{key}.so"
        if target.exists():
            _check_private(target)
            return target
        fd, scratch = tempfile.mkstemp(prefix=".bgmv-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            includes = [f"-I{folder}" for folder in dict.fromkeys(str(h.parent) for h in HEADERS)]
            done = subprocess.run([compiler, *flags, *includes, "-shared", "-fPIC", "-o", scratch, *map(str, SOURCES)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.chmod(scratch, 0o700)  # the linker's mode follows the umask; only the owner may write it
                os.replace(scratch, target)
                return target
            errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    raise RuntimeError("; ".join(errors))


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return bool(_LIBRARY.functions())


_ATTENTION_SUSPENSION = Suspension()


def attention_function() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The decode-attention kernel (``decode_attention_bf16``), or ``None`` where the kernels are unavailable or
    inside :func:`attention_suspended`."""
    if _ATTENTION_SUSPENSION.active:
        return None
    _LIBRARY.functions()
    return _LIBRARY.attention


def attention_suspended() -> AbstractContextManager[None]:
    """Within this block (this process, every thread) decode steps attend with torch's kernel: the side-by-side
    baseline of ``benchmarks/serving.py``."""
    return _ATTENTION_SUSPENSION.block()


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when it is ``True``)."""
    _LIBRARY.functions()
    return _LIBRARY.reason


_SUSPENSION = Suspension()


def suspended() -> AbstractContextManager[None]:
    """Within this block (this process, every thread) callers use torch instead of the kernel: the side-by-side
    baseline of ``benchmarks/serving.py``."""
    return _SUSPENSION.block()


def applies(x: torch.Tensor, out: torch.Tensor, rank: int) -> bool:
    """Whether :func:`bgmv_add_` can take this step: a CPU decode step (``x``: ``[rows, 1, d_in]``, one token per
    row) in bf16 or fp32 with no autograd, a rank within the kernel's limit, the kernel available, and no
    ``torch.compile`` tracing the step."""
    if _SUSPENSION.active or torch.compiler.is_compiling():  # dynamo traces torch ops; a foreign call breaks the graph
        return False
    return (x.device.type == "cpu" and x.dim() == 3 and x.shape[1] == 1 and x.dtype in DTYPES
            and out.dtype == x.dtype and rank <= MAX_RANK and not (x.requires_grad or out.requires_grad)
            and available())


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else int(t.data_ptr())


def bgmv_add_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int,
              index: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """In place, for each entry ``j``: ``out[r] += (x[r] · A[e, :rank]ᵀ) · B[e, :rank]`` with ``r = rows[j]``
    (``j`` when ``rows`` is ``None``) and ``e = index[j]`` (``j`` when ``index`` is ``None``).

    ``x``: ``[N, d_in]``; ``out``: ``[N, d_out]``; ``a``: ``[E, R, d_in]``; ``b``: ``[E, R, d_out]`` (``(scale·B)ᵀ``),
    ``rank ≤ R``; ``index`` / ``rows``: long, ``[n]``. All contiguous, on the CPU, in one dtype. The entries are
    ``len(index)``, else ``len(rows)``, else ``N``.
    """
    function = _LIBRARY.functions().get(x.dtype)
    if function is None:
        raise KernelError(f"the CPU LoRA kernel is not available for {x.dtype}: {_LIBRARY.reason or 'no such dtype'}")
    entries, padded, d_in = a.shape
    d_out = b.shape[2]
    total = x.shape[0]
    tensors = [out, x, a, b] + [t for t in (index, rows) if t is not None]
    if (any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors)
            or {out.dtype, a.dtype, b.dtype} != {x.dtype} or x.dim() != 2 or out.shape != (total, d_out)
            or x.shape[1] != d_in or b.shape[:2] != (entries, padded)
            or any(t.dtype != torch.long or t.dim() != 1 for t in (index, rows) if t is not None)):
        raise KernelError(f"bgmv_add_: bad operands out {tuple(out.shape)} x {tuple(x.shape)} a {tuple(a.shape)} "
                          f"b {tuple(b.shape)} ({x.dtype}; all must be contiguous CPU tensors of one dtype)")
    n = len(index) if index is not None else len(rows) if rows is not None else total
    if index is not None and rows is not None and len(rows) != n:
        raise KernelError(f"bgmv_add_: {len(index)} indices for {len(rows)} rows")
    code = function(n, rank, d_in, d_out, _pointer(x), _pointer(out), total, _pointer(rows), _pointer(a),
                    _pointer(b), padded, entries, _pointer(index))
    if code == 1:
        raise KernelError(f"bgmv_add_: rank {rank} exceeds the padded rank {padded} or the kernel's {MAX_RANK}")
    if code == 2:
        raise KernelError(f"bgmv_add_: a row or adapter index is out of range ({total} rows, {entries} entries)")
