"""Padding-free vs padded training batches: the same batches through the same model, alternating, one step each.

``benchmarks/train_throughput.py`` times whole runs in separate processes; on a 2-core machine their spread
(±10 % run to run) hides a gain of this size. Here one process holds one model (the SmolLM2-135M shape, random
weights, bf16 base, LoRA r = 8 on q, v, fp32 adapter; decoder blocks compiled unless ``--eager``) and runs every
batch twice — padded (right padding, ``train.padding_free: false``) and padding-free (:mod:`adapterhub_local.train.
padding_free`) — forward and backward with the loop's loss, the order flipping batch by batch. The first
``--warmup`` batches (compilation) are not counted. Reports the summed step times, their ratio, the ratio per
batch (best and median) and the padded rows per real token of the batches.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/padding_free.py [--eager] [--threads 1] [--batches 12]

Writes ``benchmarks/results/padding_free{,_eager}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapterhub_local.runtime import prepare_openmp_env

prepare_openmp_env()

import torch  # noqa: E402

from adapterhub_local import runtime  # noqa: E402
from adapterhub_local.decode_attention import use_decode_attention  # noqa: E402
from adapterhub_local.train import padding_free  # noqa: E402
from adapterhub_local.train.compilation import compile_for_training  # noqa: E402
from adapterhub_local.train.loop import make_accelerator, training_loss  # noqa: E402
from adapterhub_local.train.tasks import Batch, Example, collate_generation  # noqa: E402
from benchmarks.train_throughput import lora, make_data, make_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_seconds(model: Any, accelerator: Any, batch: Batch) -> float:
    """One training forward and backward of ``batch`` through the loop's own :func:`training_loss` (bf16
    autocast, the labelled-positions loss, the loop's attention kernel choice); gradients dropped."""
    started = time.perf_counter()
    training_loss(model, batch, accelerator, "bf16", fast=True).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=12, help="batches measured (after the warm-up ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="decoder blocks not compiled")
    args = parser.parse_args()
    runtime.configure_threads(args.threads)
    base = make_model("smollm2", torch.bfloat16)
    use_decode_attention(base)  # as models.load_base_model does
    model = lora(base)
    n = args.batches + args.warmup
    data = make_data(n * args.batch_size, 49152, args.min_len, args.max_len)
    size = args.batch_size
    padded = [collate_generation([Example(ids, list(ids)) for ids in data[i * size:(i + 1) * size]], 0)
              for i in range(n)]
    unpadded = [padding_free.unpad(b) for b in padded]
    compiled = compile_for_training(model.get_base_model(), "false" if args.eager else "true",
                                    device=torch.device("cpu"), steps=10**6, processes=1, log=print)
    accelerator = make_accelerator("bf16")
    compiled.on()
    model.train()
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"padded": [], "padding_free": []}
    for i in range(n):
        free = unpadded[i]
        assert free is not None
        sides = [("padded", padded[i]), ("padding_free", free)]
        for name, batch in sides if i % 2 else sides[::-1]:
            times[name].append(step_seconds(model, accelerator, batch))
    compiled.off()
    measured = {k: v[args.warmup:] for k, v in times.items()}
    per_batch = [p / f for p, f in zip(measured["padded"], measured["padding_free"], strict=True)]
    rows = sum(int(b.tensors["input_ids"].numel()) for b in padded[args.warmup:])
    tokens = sum(b.real_tokens for b in padded[args.warmup:])
    summary = {"padded_s": sum(measured["padded"]), "padding_free_s": sum(measured["padding_free"]),
               "speedup_total": sum(measured["padded"]) / sum(measured["padding_free"]),
               "speedup_per_batch_best": max(per_batch), "speedup_per_batch_median": statistics.median(per_batch),
               "padded_rows_per_token": rows / tokens, "tokens": tokens}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
            "compiled": not args.eager, "batches": args.batches, "warmup": args.warmup, "batch_size": args.batch_size,
            "lengths": [args.min_len, args.max_len], "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0]}
    name = "padding_free" + ("_eager" if args.eager else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "times": measured}, indent=2))
    command = " ".join(["python benchmarks/padding_free.py", *sys.argv[1:]])
    lines = [f"# Padding-free vs padded batches ({meta['date']})", "",
             f"`{command}` — SmolLM2-135M shape, bf16, LoRA r=8 "
             f"(q, v), {'compiled' if meta['compiled'] else 'eager'} blocks, {meta['threads']} thread(s), "
             f"{args.batches} batches of {args.batch_size} (lengths {args.min_len}–{args.max_len}; "
             f"{summary['padded_rows_per_token']:.2f} padded rows per real token), each run both ways, alternating; "
             f"load average {load_before:.1f} before, {meta['load_after']:.1f} after.", "",
             "| layout | forward + backward, summed (s) |", "|---|---:|",
             f"| padded | {summary['padded_s']:.2f} |", f"| padding-free | {summary['padding_free_s']:.2f} |", "",
             f"Padded ÷ padding-free: **{summary['speedup_total']:.2f}×** summed; per batch best "
             f"{summary['speedup_per_batch_best']:.2f}×, median {summary['speedup_per_batch_median']:.2f}×."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
