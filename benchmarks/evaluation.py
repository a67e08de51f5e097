"""Evaluation speed of a causal-LM adapter, each change against what it replaced, in one run: the validation
loss through the LM head on labelled positions only against the full-vocabulary forward, and HF ``generate``
(greedy and beam search) with the LM head's input made contiguous against ``generate`` as it runs by itself.

Set-up: the recipe's own base, data split and evaluation batch size (default: the E2E rank-sweep recipe,
SmolLM2-135M from its PyPI package, bf16 where the CPU multiplies it natively), its LoRA with seeded random B
(an initial adapter has B = 0 and would change nothing). Sides are interleaved over ``--rounds`` rounds; each
reports its best and median seconds. Each pair is also checked for the same results: per-example summed NLL
(the largest difference) and generated texts (how many are identical). A registry in a temporary directory
holds the base (nothing is written to the project's registry).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/evaluation.py --threads 1          # E2E recipe, ~4 minutes
    PYTHONPATH=$PWD .venv/bin/python benchmarks/evaluation.py --val-examples 16 --prompts 4 --rounds 1  # smoke

Writes ``benchmarks/results/evaluation.{json,md}``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapterhub_local.runtime import prepare_openmp_env

prepare_openmp_env()

import torch  # noqa: E402

from adapterhub_local import runtime  # noqa: E402
from adapterhub_local.inference.head_input import contiguous_head_inputs  # noqa: E402
from adapterhub_local.registry.store import Registry  # noqa: E402
from adapterhub_local.train import evaluate as ev  # noqa: E402
from adapterhub_local.train.checks import load_and_check  # noqa: E402
from adapterhub_local.train.context import build_trainable, run_context  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def randomise_lora_b(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Seeded random values in every LoRA B, so the adapter changes the base's outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, new: int, beams: int,
                contiguous_head: bool) -> list[str]:
    """HF ``generate`` on left-padded batches, as evaluation calls it, with or without the head hook."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts[start:start + batch_size]]
        ids, mask = ev.left_padded(encoded, pad)
        with contiguous_head_inputs(model) if contiguous_head else torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, num_beams=beams,
                                 **({"early_stopping": True} if beams > 1 else {}))
        texts += [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    return texts


def decoding(beams: int) -> str:
    return "greedy" if beams == 1 else f"beam{beams}"


def timed(sides: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per side per round (sides interleaved within each round) and each side's last result."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    last: dict[str, Any] = {}
    for _ in range(rounds):
        for name, side in sides.items():
            start = time.perf_counter()
            last[name] = side()
            seconds[name].append(time.perf_counter() - start)
    return seconds, last


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        recipe, data = load_and_check(args.recipe)
        registry = Registry(Path(home) / "registry")
        ctx = run_context(registry, recipe, data)
        trainable = build_trainable(recipe, ctx.record, None)
        model: Any = trainable.model
        randomise_lora_b(model)
        model.eval()
        validation = list(ctx.encoded.validation[:args.val_examples])
        prompts = [p.prompt for p in ctx.encoded.prompts[:args.prompts]]
        bs, new = recipe.eval.batch_size, recipe.eval.max_new_tokens
        sides: dict[str, Callable[[], Any]] = {
            "val_loss_full_logits": lambda: ev.token_nll_per_example(model, validation, bs, ctx.pad_id,
                                                                     head_on_labelled=False),
            "val_loss_labelled_positions": lambda: ev.token_nll_per_example(model, validation, bs, ctx.pad_id),
        }
        for beams in sorted({1, args.beams}):
            for hooked in (False, True):
                name = f"{decoding(beams)}_{'contiguous_head' if hooked else 'as_is'}"
                sides[name] = (lambda b=beams, h=hooked:  # type: ignore[misc]
                               hf_generate(model, ctx.tokenizer, prompts, bs, new, b, h))
        with torch.no_grad(), runtime.autocast(recipe.train.precision):
            load_before = os.getloadavg()
            for side in sides.values():  # warm-up
                side()
            seconds, last = timed(sides, args.rounds)
            production = {beams: ev.generate(model, ctx.tokenizer, prompts, new, bs, num_beams=beams)
                          for beams in sorted({1, args.beams})}
            load_after = os.getloadavg()
    pairs = [("val_loss_full_logits", "val_loss_labelled_positions")]
    pairs += [(f"{decoding(b)}_as_is", f"{decoding(b)}_contiguous_head") for b in sorted({1, args.beams})]
    rows = []
    for before, after in pairs:
        a, b = last[before], last[after]
        if before.startswith("val_loss"):
            same = f"per-example NLL max |diff| {max(abs(x - y) for x, y in zip(a[0], b[0], strict=True)):.3g}"
        else:
            same = f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)} texts identical"
        rows.append({"before": before, "after": after, "before_best_s": min(seconds[before]),
                     "after_best_s": min(seconds[after]), "before_median_s": statistics.median(seconds[before]),
                     "after_median_s": statistics.median(seconds[after]),
                     "speedup_best": min(seconds[before]) / min(seconds[after]),
                     "speedup_median": statistics.median(seconds[before]) / statistics.median(seconds[after]),
                     "same_results": same})
    checks = {f"evaluate.generate (beams={b}) = contiguous-head side": production[b] == last[
        f"{decoding(b)}_contiguous_head"] for b in production}
    recipe_path = args.recipe.resolve()
    shown = recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else recipe_path
    return {"recipe": str(shown), "precision": runtime.resolve_precision(recipe.train.precision),
            "val_examples": len(validation),
            "prompts": len(prompts), "eval_batch_size": bs, "max_new_tokens": new, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": load_after,
            "machine": {"torch": torch.__version__, "platform": platform.platform(),
                        "processor": platform.processor() or "cpu"},
            "pairs": rows, "production_checks": checks, "seconds": seconds}


def markdown(r: dict[str, Any]) -> str:
    lines = [f"### Evaluation speed — `{r['recipe']}` ({r['precision']}, {r['threads']} thread(s), torch "
             f"{r['machine']['torch']})", "",
             f"{r['val_examples']} validation examples, {r['prompts']} test prompts, batch {r['eval_batch_size']}, "
             f"up to {r['max_new_tokens']} new tokens; {r['rounds']} interleaved round(s), best and median.", "",
             "| before → after | before s (best / median) | after s (best / median) | speed-up best / median | "
             "same results |", "|---|---:|---:|---:|---|"]
    for row in r["pairs"]:
        lines.append(f"| {row['before']} → {row['after']} | {row['before_best_s']:.2f} / {row['before_median_s']:.2f}"
                     f" | {row['after_best_s']:.2f} / {row['after_median_s']:.2f} | {row['speedup_best']:.2f}× / "
                     f"{row['speedup_median']:.2f}× | {row['same_results']} |")
    lines += ["", "Production path (`evaluate.generate`) gives the contiguous-head side's texts: "
              + ", ".join(f"{k}: {v}" for k, v in r["production_checks"].items()) + ".",
              f"Load average before / after: {r['load_average_before']} / {r['load_average_after']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "sweep-e2e-smollm2-lora.yaml")
    parser.add_argument("--val-examples", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--beams", type=int, default=3, help="Beam width of the beam-search pair (1: greedy only).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the package's).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runtime.configure_threads(args.threads)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(results, indent=2))
    (args.out / "evaluation.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
