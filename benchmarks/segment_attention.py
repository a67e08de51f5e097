"""The padding-free row's attention kernel: :func:`~adapterhub_local.segment_attention.grouped_causal_attention`
against ``sdpa``'s math kernel (the loop's choice at short widths before) and its flash kernel.

Two measurements in one process:

1. **Kernel**: forward + backward of SmolLM2's attention shape (9 query heads, 3 key/value heads, head dim 64,
   bf16) at several widths, the three kernels compiled as the training blocks compile them (flash eager: it is an
   extern call either way), best of ``--repeats``; and each kernel's error against an fp64 reference (output and
   the three input gradients, relative Frobenius norm).
2. **Training step**: the SmolLM2-135M shape (random weights, bf16 base, LoRA r = 8 on q, v, compiled decoder
   blocks), padding-free batches of 8 sequences of 40–100 tokens, forward + backward through the loop's own
   ``training_loss``, each batch run once with the grouped kernel and once with the math kernel in its place, the
   order flipping batch by batch; the first ``--warmup`` batches (compilation) not counted.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/segment_attention.py [--threads 2] [--batches 12]

Writes ``benchmarks/results/segment_attention.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapterhub_local.runtime import prepare_openmp_env

prepare_openmp_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from adapterhub_local import runtime, segment_attention  # noqa: E402
from adapterhub_local.decode_attention import use_decode_attention  # noqa: E402
from adapterhub_local.train import padding_free  # noqa: E402
from adapterhub_local.train.compilation import compile_for_training  # noqa: E402
from adapterhub_local.train.loop import make_accelerator, training_loss  # noqa: E402
from adapterhub_local.train.tasks import Example, collate_generation  # noqa: E402
from benchmarks.train_throughput import lora, make_data, make_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, DIM = 9, 3, 64
Kernel = Callable[..., torch.Tensor]


def math_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``sdpa``'s math kernel with grouped-query heads, as transformers' ``sdpa`` attention called it here
    before; ``[rows, width, heads, dim]`` like the grouped kernel."""
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, is_causal=allowed is None,
                                             scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def flash_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)


def exact_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """fp64 reference: plain softmax attention with keys and values repeated per query head."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    width = query.shape[2]
    scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~torch.ones(width, width, dtype=torch.bool).tril(), -torch.inf)
    return (torch.softmax(scores, -1) @ value).transpose(1, 2)


def attention_inputs(rows: int, width: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(width)
    shapes = [(rows, HEADS, width, DIM), (rows, KV_HEADS, width, DIM), (rows, KV_HEADS, width, DIM)]
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


def forward_backward(kernel: Kernel, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    out = kernel(*fresh)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype))
    return [out.detach(), *(t.grad for t in fresh if t.grad is not None)]


def kernel_rows(widths: list[int], repeats: int) -> list[dict[str, Any]]:
    kernels: dict[str, Kernel] = {
        "grouped": torch.compile(segment_attention.grouped_causal_attention, dynamic=True),
        "math": torch.compile(math_kernel, dynamic=True), "flash": flash_kernel}
    rows = []
    for width in widths:
        batch_rows = max(1, 800 // width)  # ~800 positions, as a training micro-batch
        inputs = attention_inputs(batch_rows, width, torch.bfloat16)
        exact = forward_backward(exact_kernel, [t.detach().double() for t in inputs])
        row: dict[str, Any] = {"width": width, "rows": batch_rows}
        for name, kernel in kernels.items():
            got = forward_backward(kernel, inputs)  # also the compile
            row[f"{name}_error"] = [float((g.double() - e).norm() / e.norm()) for g, e in zip(got, exact,
                                                                                               strict=True)]
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                forward_backward(kernel, inputs)
                times.append(time.perf_counter() - started)
            row[f"{name}_ms"] = 1e3 * min(times)
        rows.append(row)
    return rows


def step_rows(batches: int, warmup: int) -> dict[str, Any]:
    base = make_model("smollm2", torch.bfloat16)
    use_decode_attention(base)  # as models.load_base_model does
    model = lora(base)
    n = batches + warmup
    data = make_data(n * 8, 49152, 40, 100)
    rows = []
    for i in range(n):
        row = padding_free.unpad(collate_generation([Example(ids, list(ids)) for ids in data[i * 8:(i + 1) * 8]], 0))
        assert row is not None
        rows.append(row)
    compiled = compile_for_training(model.get_base_model(), "true", device=torch.device("cpu"), steps=10**6,
                                    processes=1, log=print)
    accelerator = make_accelerator("bf16")
    grouped = segment_attention.grouped_causal_attention
    kernels: dict[str, Kernel] = {"grouped": grouped, "math": math_kernel}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    compiled.on()
    model.train()
    try:
        for i, batch in enumerate(rows):
            for name in (list(kernels) if i % 2 else list(kernels)[::-1]):
                segment_attention.grouped_causal_attention = kernels[name]
                started = time.perf_counter()
                training_loss(model, batch, accelerator, "bf16", fast=True).backward()
                model.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - started)
    finally:
        segment_attention.grouped_causal_attention = grouped
        compiled.off()
    measured = {k: v[warmup:] for k, v in times.items()}
    per_batch = [m / g for m, g in zip(measured["math"], measured["grouped"], strict=True)]
    return {"grouped_s": sum(measured["grouped"]), "math_s": sum(measured["math"]),
            "speedup_total": sum(measured["math"]) / sum(measured["grouped"]),
            "speedup_per_batch_best": max(per_batch), "speedup_per_batch_median": statistics.median(per_batch),
            "tokens": sum(b.real_tokens for b in rows[warmup:]), "times": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="training batches measured after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8, help="kernel timings per width (best kept)")
    parser.add_argument("--widths", default="64,100,128,192,256")
    args = parser.parse_args()
    runtime.configure_threads(args.threads)
    load_before = os.getloadavg()[0]
    kernels = kernel_rows([int(w) for w in args.widths.split(",")], args.repeats)
    steps = step_rows(args.batches, args.warmup)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_before": load_before, "load_after": os.getloadavg()[0], "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "segment_attention.json").write_text(json.dumps({"meta": meta, "kernels": kernels, "steps": steps},
                                                               indent=2))
    command = " ".join(["python benchmarks/segment_attention.py", *sys.argv[1:]])

    def errors(values: list[float]) -> str:
        return f"{values[0]:.1e} / {max(values[1:]):.1e}"

    lines = [f"# Padding-free attention kernel ({meta['date']})", "",
             f"`{command}` — {meta['threads']} thread(s), {meta['cpus']} CPUs, torch {meta['torch']}; load average "
             f"{load_before:.1f} before, {meta['load_after']:.1f} after.", "",
             "Forward + backward of SmolLM2's attention (9 heads, 3 key/value heads, head dim 64, bf16, ~800 "
             "positions per call), best of the repeats; error = relative to an fp64 reference, output / worst "
             "input gradient.", "",
             "| width × rows | grouped (ms) | math (ms) | flash (ms) | math ÷ grouped | flash ÷ grouped "
             "| error grouped | error math | error flash |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for row in kernels:
        lines.append(f"| {row['width']} × {row['rows']} | {row['grouped_ms']:.1f} | {row['math_ms']:.1f} | "
                     f"{row['flash_ms']:.1f} | {row['math_ms'] / row['grouped_ms']:.2f}× | "
                     f"{row['flash_ms'] / row['grouped_ms']:.2f}× | {errors(row['grouped_error'])} | "
                     f"{errors(row['math_error'])} | {errors(row['flash_error'])} |")
    lines += ["", f"Training step (SmolLM2-135M shape, LoRA r = 8 on q, v, compiled blocks, {args.batches} "
              f"padding-free batches of 8 × 40–100 tokens, each run with both kernels, alternating): math "
              f"{steps['math_s']:.2f} s, grouped {steps['grouped_s']:.2f} s summed — **{steps['speedup_total']:.3f}×**"
              f" (per batch best {steps['speedup_per_batch_best']:.3f}×, median "
              f"{steps['speedup_per_batch_median']:.3f}×)."]
    (RESULTS / "segment_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
