"""Composition serving benchmark: a batch of 32 rows of which 16 use two-adapter compositions
(``a*0.7+b*0.3``, served as their rank-concatenated ``cat`` operands) against the all-single batch
(32 distinct adapters), side by side in one run; plus the one-off cost of building a composition.

Same shapes and timing as ``benchmarks/serving.py`` (random Llama-shaped base, rank-16 LoRA on q, k, v, o;
decode throughput = rows·(new-1) tokens over first-token-to-last time, best of N interleaved rounds).

    .venv/bin/python benchmarks/compose_serving.py --preset cpu     # small model, fp32, CPU (a minute or two)
    .venv/bin/python benchmarks/compose_serving.py --preset gpu

Results go to ``benchmarks/results/compose_serving-<preset>.json`` and ``.md``. Target: composed / single >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import PRESETS, interleaved, make_adapter, make_base, stream_timer, sync

from adapterhub_local.inference import Engine
from adapterhub_local.registry import CardInfo, Registry

TARGET = 0.8


def run(preset_name: str, out_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="compose-bench-") as tmp:  # its weights go with it
        return run_in(Path(tmp), preset_name, out_dir)


def run_in(work: Path, preset_name: str, out_dir: Path) -> dict[str, Any]:
    p = PRESETS[preset_name]
    dtype = getattr(torch, p.dtype)
    registry = Registry(work / "registry")
    registry.add_base("bench", str(make_base(work / "base", p)))
    names = [f"a{i}" for i in range(p.adapters)]
    for i, name in enumerate(names):
        registry.register_adapter(name, make_adapter(work / name, p, p.rank, i), "bench",
                                  CardInfo(task_type="causal_lm"))
    torch.manual_seed(1)
    prompts = torch.randint(3, p.vocab, (p.rows, p.prompt)).tolist()
    engine = Engine(registry, "bench", mode="swap", pool_bytes=8 << 30, device=p.device, dtype=dtype)
    half = p.rows // 2
    single: list[str | None] = [names[i % len(names)] for i in range(p.rows)]
    # 16 distinct two-adapter compositions, each of two adapters the single rows do not use
    pairs = [(names[(half + i) % len(names)], names[(half + (i + 1) % half) % len(names)]) for i in range(half)]
    composed: list[str | None] = [*(names[i % len(names)] for i in range(half)),
                                  *(f"{a}*0.7+{b}*0.3" for a, b in pairs)]

    def engine_gen(refs: list[str | None]) -> Callable[[], tuple[float, float]]:
        return stream_timer(engine, prompts, refs, p.new, p.device)

    # the one-off cost of a composition: resolve, build the cat operands from the (host-cached) parents, install
    engine.load(names[0])
    engine.load(names[1])
    builds = []
    for k in range(p.repeats):
        ref = f"{names[0]}*{0.5 + k / 100}+{names[1]}*0.5"
        sync(p.device)
        start = time.perf_counter()
        engine.load(ref)
        sync(p.device)
        builds.append(time.perf_counter() - start)
        engine.unload(ref)
    systems = {"all_single": engine_gen(single), "half_composed": engine_gen(composed),
               "base": engine_gen([None] * p.rows)}
    measured = interleaved(systems, p)
    ratio = measured["half_composed"]["tokens_per_s"] / measured["all_single"]["tokens_per_s"]
    results: dict[str, Any] = {
        "preset": preset_name, "device": p.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
        "shape": {"hidden": p.hidden, "layers": p.layers, "rows": p.rows, "prompt": p.prompt, "new": p.new,
                  "rank": p.rank, "dtype": p.dtype, "compositions": half},
        "systems": measured, "ratio_composed_over_single": ratio, "target": TARGET,
        "composition_build_s": statistics.median(builds), "pool": vars(engine.stats()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"compose_serving-{preset_name}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"compose_serving-{preset_name}.md").write_text(markdown(results))
    return results


def markdown(r: dict[str, Any]) -> str:
    s = r["shape"]
    rows = {"all_single": f"{s['rows']} rows, {s['rows']} distinct single adapters",
            "half_composed": f"{s['rows'] - s['compositions']} single rows + {s['compositions']} two-adapter "
                             "compositions (distinct)",
            "base": f"{s['rows']} rows, no adapter"}
    lines = [f"### Composition serving — preset `{r['preset']}` ({r['device']}, torch {r['torch']}, "
             f"{r['threads']} threads, load average {r['loadavg'][0]:.1f})", "",
             f"Llama-shaped, random weights: hidden {s['hidden']}, {s['layers']} layers, {s['dtype']}; "
             f"{s['rows']} rows, {s['prompt']}-token prompts, {s['new']} new tokens, greedy; rank-{s['rank']} "
             "LoRA on q,k,v,o (a composition of two is rank 32).", "",
             "| batch | decode tokens/s (best of N) | median |", "|---|---:|---:|"]
    for key, label in rows.items():
        m = r["systems"][key]
        lines.append(f"| {label} | {m['tokens_per_s']:,.0f} | {m['median_tokens_per_s']:,.0f} |")
    lines += ["", f"composed / all-single: **{r['ratio_composed_over_single']:.2f}×** (target >= {r['target']}); "
              f"building one composition (resolve + cat operands + install): {1e3 * r['composition_build_s']:.1f} ms",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    result = run(args.preset, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
