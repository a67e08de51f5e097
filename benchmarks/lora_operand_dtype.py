"""The dtype of the multi-LoRA op's kept per-row operands on a CPU: fp32 (the default there,
``multi_lora.KEPT_DTYPE_CPU``) against the base's bf16, in one engine and one process, interleaved with the
engine's own base decode so every ratio comes from the same rounds.

SmolLM2-135M shape (``serving.py``'s ``smollm2`` preset: random weights, bf16 where the CPU multiplies it
natively), 32 rows × 64-token prompts, 32 distinct rank-16 adapters on q, k, v, o, greedy. Decode tokens/s
excludes the prefill and first token; "first token" is that prefill time.

    .venv/bin/python benchmarks/lora_operand_dtype.py --rounds 4 --threads 1 --new 32

Writes ``benchmarks/results/lora_operand_dtype.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from serving import PRESETS, make_adapter, make_base, stream_timer

from adapterhub_local.inference import Engine
from adapterhub_local.registry import CardInfo, Registry

Timed = Callable[[], tuple[float, float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new", type=int, default=32, help="New tokens per row.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = PRESETS["smollm2"]
    dtype = getattr(torch, p.dtype)
    work = Path(tempfile.mkdtemp(prefix="operand-dtype-"))
    registry = Registry(work / "registry")
    registry.add_base("bench", str(make_base(work / "base", p)))
    names = [f"a{i}" for i in range(32)]
    for i, name in enumerate(names):
        registry.register_adapter(name, make_adapter(work / name, p, 16, i), "bench", CardInfo(task_type="causal_lm"))
    torch.manual_seed(1)
    prompts = torch.randint(3, p.vocab, (p.rows, p.prompt)).tolist()
    engine = Engine(registry, "bench", mode="swap", pool_bytes=8 << 30, device="cpu", dtype=dtype)
    context = engine.runner.context
    adapters = stream_timer(engine, prompts, [names[i % 32] for i in range(p.rows)], args.new, "cpu")

    def kept(kept_dtype: torch.dtype | None) -> Timed:
        def go() -> tuple[float, float]:
            context.kept_dtype = kept_dtype  # operands are rebuilt for the new batch of each generate call
            return adapters()
        return go

    systems: dict[str, Timed] = {
        "engine base": stream_timer(engine, prompts, [None] * p.rows, args.new, "cpu"),
        "32 adapters, fp32 kept operands": kept(torch.float32),
        f"32 adapters, {p.dtype} kept operands": kept(None),
    }
    for run_once in systems.values():
        run_once()
    load_before = os.getloadavg()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, run_once in systems.items():
            first, end = run_once()
            samples[name].append((first, p.rows * (args.new - 1) / (end - first)))
    load_after = os.getloadavg()
    rows: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        rates, firsts = [v[1] for v in values], [v[0] for v in values]
        rows[name] = {"decode_best": max(rates), "decode_median": statistics.median(rates),
                      "first_best_s": min(firsts), "first_median_s": statistics.median(firsts)}
    base = rows["engine base"]
    for row in rows.values():
        row["vs_base_best"] = row["decode_best"] / base["decode_best"]
        row["vs_base_median"] = row["decode_median"] / base["decode_median"]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
                              "rounds": args.rounds, "new": args.new, "dtype": p.dtype,
                              "load_before": load_before, "load_after": load_after, "rows": rows}
    lines = [f"# Kept LoRA operand dtype on the CPU ({result['date']})", "",
             f"`.venv/bin/python benchmarks/lora_operand_dtype.py --rounds {args.rounds} --threads {args.threads} "
             f"--new {args.new}` — SmolLM2-135M shape, {p.dtype}, {p.rows} rows × {p.prompt}-token prompts, "
             f"{args.new} new tokens, 32 distinct rank-16 adapters on q, k, v, o; {args.rounds} interleaved rounds; "
             f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}.", "",
             "| system | decode tokens/s best / median | × engine base (best / median) | first token s best / median |",
             "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['decode_best']:.0f} / {row['decode_median']:.0f} | "
                     f"{row['vs_base_best']:.3f} / {row['vs_base_median']:.3f} | "
                     f"{row['first_best_s']:.2f} / {row['first_median_s']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_operand_dtype.json").write_text(json.dumps(result, indent=2))
    (args.out / "lora_operand_dtype.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
