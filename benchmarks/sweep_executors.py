"""The same tiny rank sweep run by the local executor (this process, one point after another) and by the Ray
executor (one task per point on a local Ray runtime), in interleaved rounds; best and median sweep wall time of
each, the ratio ray / local, the Ray runtime's start-up (once, not in the ratio) and the load average.

    OMP_NUM_THREADS=1 python benchmarks/sweep_executors.py --rounds 3 --out benchmarks/results

The model is a 2-layer, 32-wide Llama built here (as in the tests), so the figures measure the executors'
overhead (task submission, worker start-up and imports, per-task data check and base loading) more than
training; on a machine with few cores Ray is expected to be slower. Writes ``<out>/sweep_executors.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cpus", type=int, default=2, help="CPU slots of the local Ray runtime")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import ray

    from adapterhub_local.registry import Registry
    from adapterhub_local.sweep.driver import run_sweep
    from adapterhub_local.sweep.plan import SweepConfig
    from adapterhub_local.sweep.ray_executor import ExecutorOptions
    from tests.sweep.conftest import make_tiny_llama_with_tokenizer, recipe_for

    root = Path(tempfile.mkdtemp(prefix="sweep-executors-"))
    registry = Registry(root / "registry")
    registry.add_base("tiny-lm", str(make_tiny_llama_with_tokenizer(root / "tiny-lm")))
    data = root / "gen.jsonl"
    data.write_text("".join(json.dumps({"mr": f"name[{n}], food[{f}]", "ref": f"{n} serves {f} food."}) + "\n"
                            for n in ("Aromi", "Cotto", "Giraffe", "Loch Fyne", "Strada", "Zizzi", "Wildwood")
                            for f in ("Chinese", "French", "Italian")), encoding="utf-8")
    ranks = [int(r) for r in args.ranks.split(",")]
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for round_ in range(args.rounds):
        for executor in ("local", "ray"):
            recipe = recipe_for("gen", data, root / "runs", max_steps=args.steps)
            config = SweepConfig(ranks=ranks, sweep_id=f"bench-{executor}-{round_}", e2e_metrics=False)
            t0 = time.perf_counter()
            run_sweep(registry, recipe, config, progress=False, log=lambda _: None,
                      executor=ExecutorOptions(executor, num_cpus=1))
            times[executor].append(time.perf_counter() - t0)
            print(f"round {round_} {executor}: {times[executor][-1]:.1f} s", flush=True)
    ray.shutdown()
    summary: dict[str, Any] = {
        "ranks": ranks, "steps": args.steps, "rounds": args.rounds, "ray_cpus": args.cpus,
        "ray_start_s": ray_start_s, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **{f"{k}_s": v for k, v in times.items()},
        **{f"{k}_best_s": min(v) for k, v in times.items()},
        **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
    }
    summary["ray_over_local_best"] = summary["ray_best_s"] / summary["local_best_s"]
    summary["ray_over_local_median"] = summary["ray_median_s"] / summary["local_median_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_executors.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    load = ", ".join(f"{x:.2f}" for x in summary["load_average"])
    md = ("| executor | best s | median s | ratio (best) | ratio (median) |\n|---|---|---|---|---|\n"
          f"| local | {summary['local_best_s']:.1f} | {summary['local_median_s']:.1f} | 1 | 1 |\n"
          f"| ray ({args.cpus} CPU slots) | {summary['ray_best_s']:.1f} | {summary['ray_median_s']:.1f} | "
          f"{summary['ray_over_local_best']:.2f} | {summary['ray_over_local_median']:.2f} |\n\n"
          f"{len(ranks)} points × {args.steps} steps, {args.rounds} interleaved rounds; Ray runtime start "
          f"{ray_start_s:.1f} s (not included); load average {load} on {os.cpu_count()} CPUs.\n")
    (args.out / "sweep_executors.md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
