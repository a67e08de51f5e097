"""Multi-process training speed-up: the same recipe and global batch trained by 2 processes (DDP over gloo, 1 thread
each, ``accelerate launch --multi_gpu --num_processes 2``; without GPUs these are CPU processes; and FSDP,
``--use_fsdp --fsdp_version 2``, which shards the model across them) against 1 process with 1 thread and with 2
threads, interleaved over ``--rounds`` rounds; best and median of each side, and the load average around every run
(on a shared machine the figures move with it).

Measured: training tokens/s as the run reports it (the main process's training-loop seconds, evaluations and
start-up excluded: ``final_metrics.json`` → ``training.tokens_per_s``) and the command's wall time (start-up,
model loading and the small final evaluation included).

    .venv/bin/python benchmarks/ddp_speedup.py                      # sentiment (MiniLM, LoRA), 30 steps, 3 rounds
    .venv/bin/python benchmarks/ddp_speedup.py --steps 5 --rounds 1  # a smoke test
    .venv/bin/python benchmarks/ddp_speedup.py --sides 2proc_1thread 2proc_fsdp --out fsdp_speedup  # some sides

Writes ``benchmarks/results/ddp_speedup.{json,md}`` (``--out NAME``: ``NAME.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("1proc_1thread", "1proc_2threads", "2proc_1thread", "2proc_fsdp")
LABELS = {"1proc_1thread": "1 process × 1 thread", "1proc_2threads": "1 process × 2 threads",
          "2proc_1thread": "2 processes × 1 thread (DDP, gloo)",
          "2proc_fsdp": "2 processes × 1 thread (FSDP2, gloo)"}
STRATEGY_FLAGS = {"2proc_1thread": ["--multi_gpu"], "2proc_fsdp": ["--use_fsdp", "--fsdp_version", "2"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(side: str, registry: Path, recipe: Path, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    threads = "2" if side == "1proc_2threads" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "", "ADAPTERHUB_DIST_TIMEOUT": "600"}
    cli = ["-m", "adapterhub_local", "--threads", threads, "-R", str(registry), "train", str(recipe), *overrides,
           "--no-check", "--json", "--no-progress"]
    if side in STRATEGY_FLAGS:
        return [sys.executable, "-m", "accelerate.commands.launch", *STRATEGY_FLAGS[side], "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), *cli], env
    return [sys.executable, *cli], env


def run_side(side: str, registry: Path, recipe: Path, overrides: list[str]) -> dict[str, Any]:
    cmd, env = command(side, registry, recipe, overrides)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    training = json.loads(done.stdout)["training"]
    return {"tokens_per_s": training["tokens_per_s"], "train_seconds": training["train_seconds"],
            "train_tokens": training["train_tokens"], "steps": training["steps"], "wall_s": wall,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def measure(recipe: Path, steps: int, n_rounds: int, sides: tuple[str, ...], work: Path) -> list[dict[str, Any]]:
    """Run every side `n_rounds` times, interleaved (the order flips each round), under `work`."""
    # No periodic evaluation, a small final one, nothing registered: the figure is the training loop's.
    overrides = [f"train.max_steps={steps}", f"train.eval_every={steps}", "data.max_eval_examples=64",
                 "eval.max_test_examples=64", "output.register=false", "output.tag=null",
                 f"output.runs_dir={work / 'runs'}"]
    registry = work / "registry"
    run_side("1proc_1thread", registry, recipe, [*overrides, "train.max_steps=1", "train.eval_every=1"])  # warm-up
    rounds: list[dict[str, Any]] = []
    for r in range(n_rounds):
        order = sides if r % 2 == 0 else tuple(reversed(sides))
        results = {side: run_side(side, registry, recipe, overrides) for side in order}
        rounds.append(results)
        print(f"round {r + 1}: " + ", ".join(f"{s} {results[s]['tokens_per_s']:.0f} tok/s" for s in sides),
              flush=True)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "sentiment-minilm-lora.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="which sides to run (1proc_1thread, the baseline, always runs)")
    parser.add_argument("--out", default="ddp_speedup", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    sides = tuple(s for s in SIDES if s in args.sides or s == "1proc_1thread")
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:  # runs and registry go with it
        rounds = measure(args.recipe, args.steps, args.rounds, sides, Path(tmp))
    summary: dict[str, Any] = {}
    for side in sides:
        rates = [rd[side]["tokens_per_s"] for rd in rounds]
        walls = [rd[side]["wall_s"] for rd in rounds]
        summary[side] = {"best_tokens_per_s": max(rates), "median_tokens_per_s": statistics.median(rates),
                         "best_wall_s": min(walls), "median_wall_s": statistics.median(walls)}
    base = summary["1proc_1thread"]
    for side in sides:
        summary[side]["speedup_best"] = summary[side]["best_tokens_per_s"] / base["best_tokens_per_s"]
        summary[side]["speedup_median"] = summary[side]["median_tokens_per_s"] / base["median_tokens_per_s"]
    loads = [v for rd in rounds for s in sides for v in (rd[s]["load_before"], rd[s]["load_after"])]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "recipe": str(args.recipe.relative_to(ROOT)),
            "steps": args.steps, "rounds": args.rounds, "cpus": os.cpu_count(), "machine": platform.processor(),
            "load_min": min(loads), "load_max": max(loads), "load_median": statistics.median(loads)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds},
                                                         indent=2))
    lines = [f"# Multi-process training speed-up ({meta['date']})", "",
             f"{meta['recipe']}, {args.steps} steps (global batch as in the recipe), {args.rounds} interleaved rounds, "
             f"{meta['cpus']} CPUs; load average {meta['load_min']:.1f}–{meta['load_max']:.1f} "
             f"(median {meta['load_median']:.1f}) during the runs.", "",
             "| side | tokens/s best | tokens/s median | × 1 thread (best / median) | wall s best | wall s median |",
             "|---|---|---|---|---|---|"]
    for side in sides:
        s = summary[side]
        lines.append(f"| {LABELS[side]} | {s['best_tokens_per_s']:.0f} | {s['median_tokens_per_s']:.0f} | "
                     f"{s['speedup_best']:.2f} / {s['speedup_median']:.2f} | {s['best_wall_s']:.1f} | "
                     f"{s['median_wall_s']:.1f} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
