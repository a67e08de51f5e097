"""Concurrent against sequential rank sweeps: wall time and peak memory of the same sweep (same ranks, same
steps, same data), in one run. Each mode runs in its own fresh process so that its peak RSS (or CUDA peak) is
its own; ``--rounds N`` interleaves the modes N times and reports best and median, with the load average.
Writes ``<out>/sweep-<preset>.json`` and ``<out>/sweep-<preset>.md``.

    python benchmarks/sweep.py --preset cpu-small --out benchmarks/results      # MiniLM, 11 ranks, few steps
    python benchmarks/sweep.py --preset gpu --out benchmarks/results            # SmolLM2 E2E, 11 ranks

Figures: ``sweep_wall_s`` is the whole ``run_sweep`` (set-up, training, final evaluation and registration of
every rank); ``train_s`` is the training alone (sequential: the sum of the runs' training loops; concurrent: the
joint loop). The target on a GPU is concurrent ≤ 0.4× sequential sweep wall time. Each mode's sweep report
(results.md/csv/json, plots) is kept in ``<out>/sweep-<mode>-report/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {
        "recipe": "recipes/sweep-sentiment-minilm-lora.yaml",
        "ranks": "1,2,4,8,16,32,64,128,256,512,1024",
        "overrides": ["train.max_steps=8", "train.batch_size=16", "train.eval_every=8", "data.max_train_examples=256",
                      "data.max_eval_examples=64", "data.validation_fraction=0.02", "data.test_fraction=0.02",
                      "train.log_every=100"],
    },
    "gpu": {
        "recipe": "recipes/sweep-e2e-smollm2-lora.yaml",
        "ranks": "1,2,4,8,16,32,64,128,256,512,1024",
        "overrides": ["train.max_steps=100", "train.eval_every=100", "method.dropout=0.0", "data.max_eval_examples=200",
                      "eval.max_test_examples=50", "eval.max_new_tokens=48"],
    },
}


def _child(mode: str, recipe_path: str, ranks: str, overrides: list[str], work: Path, out: Path) -> dict[str, Any]:
    """One sweep in this (fresh) process; returns its figures and keeps its report under ``out``."""
    import shutil

    from adapterhub_local import runtime  # first: passive OpenMP waiting is set before torch loads

    runtime.configure_threads(None)  # $ADAPTERHUB_THREADS, pinned by the parent
    import torch

    from adapterhub_local.config import load_recipe
    from adapterhub_local.registry import Registry
    from adapterhub_local.sweep.driver import run_sweep
    from adapterhub_local.sweep.plan import SweepConfig, parse_ranks

    registry = Registry(work / "registry")
    recipe = load_recipe(recipe_path, dict(o.split("=", 1) for o in [*overrides, f"output.runs_dir={work / 'runs'}"]))
    # Register the base before the clock starts: both modes share that one-off cost.
    from adapterhub_local.train.runner import ensure_base

    ensure_base(registry, recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = run_sweep(registry, recipe, SweepConfig(ranks=parse_ranks(ranks), mode=mode, sweep_id=f"bench-{mode}"),
                        progress=False, log=lambda _: None)
    wall = time.perf_counter() - started
    report = out / f"sweep-{mode}-report"
    shutil.rmtree(report, ignore_errors=True)
    shutil.copytree(Path(summary["directory"]), report, ignore=shutil.ignore_patterns("runs", "state.json"))
    points = json.loads((Path(summary["directory"]) / "results.json").read_text())["points"]
    train_s = 0.0
    tokens = 0
    for row in points:
        card = registry.resolve(row["adapter"])
        train_s += float(card.training.get("train_seconds") or 0.0)
        tokens += int(card.training.get("train_tokens") or 0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "mode": mode, "sweep_wall_s": wall, "train_s": train_s, "train_tokens": tokens,
        "train_tokens_per_s": tokens / train_s if train_s else None, "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "process_max_rss",
        "ranks": [r["rank"] for r in points], "knee": summary.get("knee"),
        "primary_metric": summary.get("primary_metric"), "threads": torch.get_num_threads(),
        "precision": runtime.resolve_precision(recipe.train.precision),
        "metric_by_rank": {r["rank"]: r.get(summary.get("primary_metric") or "val_loss") for r in points},
    }


def _markdown(result: dict[str, Any]) -> str:
    seq, con = result["sequential"], result["concurrent"]
    lines = [
        f"# Rank sweep: concurrent vs sequential ({result['preset']}, {result['device']})", "",
        f"`{result['command']}`", "",
        f"Recipe `{result['recipe']}`, ranks {result['ranks']}, overrides `{' '.join(result['overrides'])}`.", "",
        f"{result['rounds']} interleaved round(s); best / median; load average after each run "
        f"{min(result['load_average_after_each_run']):.1f}–{max(result['load_average_after_each_run']):.1f}.", "",
        "| mode | sweep wall s best / median | train s best / median | train tokens/s | peak memory MB |",
        "|---|---|---|---|---|",
    ]
    for row in (seq, con):
        lines.append(f"| {row['mode']} | {row['sweep_wall_s']:.1f} / {row['sweep_wall_s_median']:.1f} | "
                     f"{row['train_s']:.1f} / {row['train_s_median']:.1f} | "
                     f"{(row['train_tokens_per_s'] or 0):.0f} | {row['peak_memory_mb']:.0f} |")
    lines += ["", f"- concurrent / sequential sweep wall time: **{result['ratio_sweep_wall']:.2f}×** best, "
              f"{result['ratio_sweep_wall_median']:.2f}× median",
              f"- concurrent / sequential training time: **{result['ratio_train']:.2f}×**",
              f"- concurrent / sequential peak memory: **{result['ratio_peak_memory']:.2f}×** "
              f"({seq['peak_memory_kind']})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--ranks", help="Override the preset's ranks (comma-separated).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra recipe override k=v.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ADAPTERHUB_THREADS") or 2),
                        help="torch threads of both modes (pinned; default $ADAPTERHUB_THREADS or 2).")
    parser.add_argument("--rounds", type=int, default=1, help="Interleaved rounds (both modes once per round).")
    parser.add_argument("--child", choices=["sequential", "concurrent"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    ranks = args.ranks or preset["ranks"]
    overrides = [*preset["overrides"], *args.overrides]
    if args.child:
        figures = _child(args.child, preset["recipe"], ranks, overrides, args.work, args.out)
        print("RESULT " + json.dumps(figures))
        return
    result: dict[str, Any] = {"preset": args.preset, "recipe": preset["recipe"], "ranks": ranks,
                              "overrides": overrides, "command": "python " + " ".join(sys.argv),
                              "python": platform.python_version(), "rounds": args.rounds}
    rounds: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
    load: list[float] = []
    for round_ in range(args.rounds):  # interleaved: each round runs both modes, so load drifts hit both
        for mode in ("sequential", "concurrent"):
            with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
                work = Path(tmp) / mode
                work.mkdir()
                command = [sys.executable, __file__, "--preset", args.preset, "--ranks", ranks, "--child", mode,
                           "--work", str(work), "--out", str(args.out), *[f"--set={o}" for o in args.overrides]]
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "ADAPTERHUB_THREADS": str(args.threads)}
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"{mode} sweep failed (exit {done.returncode})")
            figures = json.loads(lines[-1][len("RESULT "):])
            rounds[mode].append(figures)
            load.append(os.getloadavg()[0])
            print(f"round {round_ + 1}: {mode}: sweep {figures['sweep_wall_s']:.1f} s, "
                  f"train {figures['train_s']:.1f} s, peak {figures['peak_memory_mb']:.0f} MB", flush=True)
    for mode, runs in rounds.items():
        best = min(runs, key=lambda r: r["sweep_wall_s"])
        result[mode] = {**best, "sweep_wall_s_median": statistics.median(r["sweep_wall_s"] for r in runs),
                        "train_s_median": statistics.median(r["train_s"] for r in runs),
                        "sweep_wall_s_rounds": [r["sweep_wall_s"] for r in runs]}
    result["load_average_after_each_run"] = load
    import torch

    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({result['sequential']['threads']} threads, {result['sequential']['precision']})"
    seq, con = result["sequential"], result["concurrent"]
    result["ratio_sweep_wall"] = con["sweep_wall_s"] / seq["sweep_wall_s"]
    result["ratio_sweep_wall_median"] = con["sweep_wall_s_median"] / seq["sweep_wall_s_median"]
    result["ratio_train"] = con["train_s"] / seq["train_s"] if seq["train_s"] else None
    result["ratio_peak_memory"] = con["peak_memory_mb"] / seq["peak_memory_mb"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep-{args.preset}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (args.out / f"sweep-{args.preset}.md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))


if __name__ == "__main__":
    main()
