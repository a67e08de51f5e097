"""runtime: OpenMP waiting set before torch loads, thread counts, bf16 detection and the precision helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub_local import runtime
from adapterhub_local.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in runtime.OPENMP_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})
    return proc.stdout.strip()


def test_importing_the_package_sets_passive_openmp_waiting_before_torch_loads() -> None:
    out = _python("import sys, os, adapterhub_local; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'], "
                  "os.environ['KMP_BLOCKTIME'])")
    assert out == "False PASSIVE 0"


def test_a_users_own_openmp_setting_is_kept() -> None:
    assert _python("import os, adapterhub_local; print(os.environ['OMP_WAIT_POLICY'])",
                   OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_too_late_once_torch_is_loaded() -> None:
    # torch first: OpenMP has read its environment already, so nothing is set and the caller is told.
    out = _python("import torch, os; from adapterhub_local import runtime; "
                  "print(runtime.prepare_openmp_env(), os.environ.get('OMP_WAIT_POLICY'))")
    assert out.endswith("False None")


def test_configure_threads_explicit_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_requested", None)
    try:
        monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
        assert runtime.configure_threads(None) == runtime.default_threads() <= runtime.available_cpus()
        assert runtime.requested_threads() is None
        monkeypatch.setenv(runtime.THREADS_ENV, "1")
        assert runtime.configure_threads(None) == 1 and runtime.requested_threads() == 1
        monkeypatch.delenv(runtime.THREADS_ENV)
        assert runtime.configure_threads(2) == 2
        # A recipe's own count yields to an explicit --threads.
        assert runtime.configure_recipe_threads(1) == 2
        monkeypatch.setattr(runtime, "_requested", None)
        assert runtime.configure_recipe_threads(1) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_thread_counts_are_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(runtime.THREADS_ENV, bad)
    with pytest.raises(ConfigError, match="thread"):
        runtime.configure_threads(None)


def test_available_cpus_never_exceeds_the_affinity_mask() -> None:
    assert 1 <= runtime.available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("flags", "native"), [
    ({"avx512f", "amx_bf16", "amx_tile"}, True), ({"avx512f", "avx512_bf16"}, True), ({"asimd", "bf16"}, True),
    ({"avx512f", "avx2"}, False), (set(), False),
])
def test_native_bf16_detection(flags: set[str], native: bool) -> None:
    assert runtime.cpu_has_native_bf16(frozenset(flags)) is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda flags=None: native)
    assert runtime.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert runtime.base_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert runtime.resolve_precision("fp32", "cpu") == "fp32" and runtime.resolve_precision("bf16", "cpu") == "bf16"
    assert runtime.base_dtype("fp16", "cpu") == torch.float32  # fp16 is autocast only; the base stays fp32


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="fp8"):
        runtime.resolve_precision("fp8")


def test_bf16_autocast_lets_fp32_trainables_meet_a_bf16_base() -> None:
    base = torch.nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    head = torch.nn.Linear(8, 2).to(torch.bfloat16)
    model = torch.nn.Sequential(base, head)
    assert runtime.upcast_trainable(model) == 2  # the head's weight and bias
    assert base.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):  # without autocast the dtypes do not meet
        model(x)
    with runtime.autocast("bf16", "cpu"):
        model(x).float().sum().backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    with runtime.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
