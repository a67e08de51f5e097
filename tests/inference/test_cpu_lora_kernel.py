"""The CPU decode kernel (BGMV): torch's arithmetic per row, rows independent, bad calls refused, a clean fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub_local.inference import Engine, Request, SamplingParams, cpu_lora_kernel, multi_lora
from adapterhub_local.inference.cpu_lora_kernel import KernelError, bgmv_add_
from adapterhub_local.registry import Registry
from tests.inference.conftest import LORA_SPECS

needs_kernel = pytest.mark.skipif(not cpu_lora_kernel.available(),
                                  reason=f"no CPU LoRA kernel here: {cpu_lora_kernel.unavailable_reason()}")


def reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int,
              index: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """What the engine computes without the kernel: ``out + bmm(bmm(x, Aᵀ), B)`` on the chosen rows."""
    n = len(index) if index is not None else len(rows) if rows is not None else x.shape[0]
    rows_ = rows if rows is not None else torch.arange(n)
    index_ = index if index is not None else torch.arange(n)
    xa = x.index_select(0, rows_)[:, None]
    delta = torch.bmm(torch.bmm(xa, a[index_, :rank].transpose(1, 2)), b[index_, :rank])[:, 0]
    expected = out.clone()
    expected[rows_] = out[rows_] + delta
    return expected


def operands(dtype: torch.dtype, n: int, entries: int, padded: int, d_in: int, d_out: int,
             seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    a = (torch.randn(entries, padded, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = (torch.randn(entries, padded, d_out, generator=g) * 0.1).to(dtype)
    out = torch.randn(n, d_out, generator=g).to(dtype)
    return x, a, b, out


def assert_as_torch(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: equal to rounding; bf16: at most one unit in the last place apart (the order of fp32 sums differs)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
    assert bool(((got.float() - want.float()).abs() <= ulp).all()), (got.float() - want.float()).abs().max()
    assert (got != want).float().mean().item() < 0.01  # nearly every value is torch's exact bits


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "rank", "padded", "d_in", "d_out"), [
    (1, 1, 1, 16, 16), (5, 3, 8, 33, 17), (32, 16, 16, 576, 192), (7, 64, 64, 100, 1100), (3, 8, 32, 64, 513),
    (70, 2048, 2048, 8, 8)])
def test_kept_operands_equal_torch(dtype: torch.dtype, n: int, rank: int, padded: int, d_in: int,
                                   d_out: int) -> None:
    """Operands gathered per row (entry j is row j), odd widths, outputs wider than the kernel's chunk, a padded
    rank larger than the one computed, and more entries than one block of the kernel's shrink buffer holds
    (65,536 floats: 32 entries at rank 2,048)."""
    x, a, b, out = operands(dtype, n, n, padded, d_in, d_out, seed=n + rank)
    want = reference(out, x, a, b, rank, None, None)
    bgmv_add_(out, x, a, b, rank)
    assert_as_torch(out, want, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stack_indices_and_row_subsets_equal_torch(dtype: torch.dtype) -> None:
    """Reading a slot stack by index, for some rows of the batch only (a rank group): other rows untouched."""
    x, a, b, out = operands(dtype, 9, 6, 32, 72, 40, seed=3)
    index = torch.tensor([5, 0, 2, 5])
    rows = torch.tensor([8, 1, 4, 0])
    want = reference(out, x, a, b, 16, index, rows)
    before = out.clone()
    bgmv_add_(out, x, a, b, 16, index, rows)
    assert_as_torch(out, want, dtype)
    untouched = [i for i in range(9) if i not in rows.tolist()]
    assert torch.equal(out[untouched], before[untouched])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rows_result_does_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    """The mixed-batch invariant at the kernel: each row alone gives the very bits it got in the batch."""
    x, a, b, out = operands(dtype, 12, 12, 16, 96, 80, seed=7)
    together = out.clone()
    bgmv_add_(together, x, a, b, 16)
    for row in range(12):
        alone = out.clone()
        bgmv_add_(alone, x, a, b, 16, torch.tensor([row]), torch.tensor([row]))
        assert torch.equal(alone[row], together[row])


@needs_kernel
def test_bad_calls_are_refused_not_run() -> None:
    x, a, b, out = operands(torch.bfloat16, 4, 4, 8, 32, 24, seed=1)
    before = out.clone()
    with pytest.raises(KernelError, match="out of range"):
        bgmv_add_(out, x, a, b, 8, torch.tensor([0, 1, 2, 4]))  # 4 entries: index 4 does not exist
    with pytest.raises(KernelError, match="out of range"):
        bgmv_add_(out, x, a, b, 8, None, torch.tensor([0, -1]))
    assert torch.equal(out, before)  # a refused call writes nothing, not even the entries before the bad one
    with pytest.raises(KernelError, match="padded rank"):
        bgmv_add_(out, x, a, b, 9)
    with pytest.raises(KernelError, match="bad operands"):
        bgmv_add_(out, x.float(), a, b, 8)  # mixed dtypes
    with pytest.raises(KernelError, match="bad operands"):
        bgmv_add_(out, x, a.transpose(1, 2).contiguous().transpose(1, 2), b, 8)  # not contiguous
    with pytest.raises(KernelError, match="bad operands"):
        bgmv_add_(out[:, :20].contiguous(), x, a, b, 8)  # output width is not B's
    with pytest.raises(KernelError, match="indices for"):
        bgmv_add_(out, x, a, b, 8, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))


@needs_kernel
def test_the_build_is_cached_per_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_lora_kernel.CACHE_ENV, str(tmp_path))
    first = cpu_lora_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_lora_kernel.build() == first and first.stat().st_mtime_ns == stamp  # not compiled again
    built = {first}
    (tmp_path / "src").mkdir()
    for group in ("SOURCES", "HEADERS"):  # an edit to any source or header is a new build
        files = getattr(cpu_lora_kernel, group)
        for k, source in enumerate(files):
            edited = tmp_path / "src" / source.name
            edited.write_text(source.read_text() + "\n/* edited */\n")
            with monkeypatch.context() as patch:
                patch.setattr(cpu_lora_kernel, group, (*files[:k], edited, *files[k + 1:]))
                built.add(cpu_lora_kernel.build())
    assert len(built) == 1 + len(cpu_lora_kernel.SOURCES) + len(cpu_lora_kernel.HEADERS)
    assert not list(tmp_path.glob(".bgmv-*"))  # no scratch file left behind


@needs_kernel
def test_a_cache_others_may_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(cpu_lora_kernel.CACHE_ENV, str(shared))
    with pytest.raises(RuntimeError, match="writable by others"):
        cpu_lora_kernel.build()
    shared.chmod(0o700)
    built = cpu_lora_kernel.build()
    built.chmod(0o666)  # someone could have swapped it
    with pytest.raises(RuntimeError, match="writable by others"):
        cpu_lora_kernel.build()


def test_without_a_compiler_it_says_why_and_callers_fall_back(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv(cpu_lora_kernel.CACHE_ENV, str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(cpu_lora_kernel.shutil, "which", lambda name: None)
    library = cpu_lora_kernel._Library()
    monkeypatch.setattr(cpu_lora_kernel, "_LIBRARY", library)
    assert not cpu_lora_kernel.available()
    assert "no C compiler" in (cpu_lora_kernel.unavailable_reason() or "")
    x = torch.zeros(2, 1, 8)
    assert not cpu_lora_kernel.applies(x, torch.zeros(2, 1, 8), 4)
    with pytest.raises(KernelError, match="not available"):
        bgmv_add_(torch.zeros(2, 8), x[:, 0], torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), 4)


def test_the_switch_turns_it_off() -> None:
    code = ("from adapterhub_local.inference import cpu_lora_kernel as k; "
            "print(k.available(), k.unavailable_reason())")
    env = {**os.environ, cpu_lora_kernel.SWITCH_ENV: "off"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == f"False disabled by {cpu_lora_kernel.SWITCH_ENV}", done.stderr


def test_applies_only_to_cpu_decode_steps_without_autograd() -> None:
    if not cpu_lora_kernel.available():
        pytest.skip("no kernel")
    step, out = torch.zeros(4, 1, 16, dtype=torch.bfloat16), torch.zeros(4, 1, 8, dtype=torch.bfloat16)
    assert cpu_lora_kernel.applies(step, out, 16)
    assert not cpu_lora_kernel.applies(torch.zeros(4, 3, 16, dtype=torch.bfloat16), out, 16)  # a prefill
    assert not cpu_lora_kernel.applies(step.half(), out.half(), 16)
    assert not cpu_lora_kernel.applies(step, out.float(), 16)
    assert not cpu_lora_kernel.applies(step, out, cpu_lora_kernel.MAX_RANK + 1)
    assert not cpu_lora_kernel.applies(step.float().requires_grad_(), out.float(), 16)
    with cpu_lora_kernel.suspended():
        assert not cpu_lora_kernel.applies(step, out, 16)
    assert cpu_lora_kernel.applies(step, out, 16)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_decode_with_the_kernel_equals_torch(zoo: Registry, monkeypatch: pytest.MonkeyPatch,
                                                    dtype: torch.dtype) -> None:
    """A mixed batch (ranks 1…64, a row without an adapter) decodes to the same tokens with the kernel as with
    torch's bmm, and the kernel really ran."""
    engine = Engine(zoo, "tiny", mode="swap", dtype=dtype)
    requests = [Request(prompt=f"row {i} says", adapter=ref,
                        sampling=SamplingParams(max_new_tokens=10, stop_at_eos=False))
                for i, ref in enumerate([*LORA_SPECS, None])]
    calls = 0
    real = cpu_lora_kernel.bgmv_add_

    def counted(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_lora_kernel, "bgmv_add_", counted)
    with_kernel = [r.token_ids for r in engine.generate(requests)]
    assert calls > 0
    monkeypatch.setattr(multi_lora, "kernel_applies", lambda *args: False)
    assert [r.token_ids for r in engine.generate(requests)] == with_kernel
