"""What each combination method keeps: two trained adapters combined with every method, each parent and each
combination scored on both parents' held-out test splits (the rows each parent was scored on when trained).

    adapterhub -R REG train recipes/e2e-smollm2-lora.yaml ...           # parent 1 (task e2e)
    adapterhub -R REG train sentiment-as-generation recipe ...          # parent 2 (task sentiment)
    .venv/bin/python benchmarks/compose_tasks.py -R REG e2e-smollm2-lora sentiment-gen-smollm2-lora \\
        --weights 0.5,0.5 --max-examples 32

Writes ``benchmarks/results/compose_tasks.json`` and ``.md``: a task × adapter table (completion loss, BLEU,
ROUGE-L, exact match). Every combination is registered under ``combo-<method>`` in the given registry.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from adapterhub_local.compose.combine import CombineOptions, combine
from adapterhub_local.compose.evaluate import parent_tasks, score
from adapterhub_local.compose.spec import parse_weights
from adapterhub_local.registry import Registry

METHODS: dict[str, CombineOptions] = {
    "cat": CombineOptions("cat"), "linear": CombineOptions("linear"), "svd": CombineOptions("svd"),
    "ties": CombineOptions("ties", density=0.5), "dare_linear": CombineOptions("dare_linear", density=0.5),
    "dare_ties": CombineOptions("dare_ties", density=0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parents", nargs=2)
    parser.add_argument("-R", "--registry", type=Path, required=True)
    parser.add_argument("--weights", default="0.5,0.5")
    parser.add_argument("--max-examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    registry = Registry.open(args.registry)
    weights = parse_weights(args.weights, 2)
    start = time.perf_counter()
    children = {m: combine(registry, list(args.parents), weights, f"combo-{m.replace('_', '-')}", o).ref
                for m, o in METHODS.items()}
    result = parent_tasks(registry, children["cat"], args.max_examples)
    result.models = [m for m in result.models if m != children["cat"]] + list(children.values())
    score(registry, result, max_new_tokens=args.max_new_tokens)
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "loadavg": os.getloadavg(),
                            "weights": weights, "methods": {m: o.params() for m, o in METHODS.items()},
                            "children": children, "seconds": time.perf_counter() - start, **result.to_dict()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compose_tasks.json").write_text(json.dumps(data, indent=2))
    (args.out / "compose_tasks.md").write_text(markdown(data))
    print(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    metrics = ("loss", "bleu", "rougeL", "exact_match")
    lines = [f"### Combining two adapters — {data['date']}, weights {data['weights']}, load average "
             f"{data['loadavg'][0]:.1f}", ""]
    for task in data["tasks"]:
        lines += [f"**task {task['task']}** (held-out test rows of {task['parent']}: {task['n']})", "",
                  "| adapter | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for model, scores in task["scores"].items():
            lines.append(f"| {model} | " + " | ".join(f"{scores[m]:.3f}" if m in scores else "–" for m in metrics)
                         + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
