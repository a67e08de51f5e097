"""Embedding-kind serving benchmark: a mixed batch in which 4 rows use an embedding LoRA (rank r on the input
embedding, plus the usual q, k, v, o LoRA) and 4 rows trainable tokens (16 token rows, plus q, k, v, o LoRA), the
other 24 rows plain LoRA (one adapter per row, 32 rows), against the same batch with 32 plain LoRA adapters,
decoded by the same engine in the same run (interleaved rounds, so load from other processes hits both alike).

Per row and step the embedding wrapper gathers T rows of the row's ``Aᵀ`` (``[T, r]``) and multiplies by its
``scale·Bᵀ`` (``[r, d]``), and compares T ids with the row's K listed ids: ``O(T·(r + K)·d)``, independent of
the vocabulary size and of the number of adapters. Target (ours, like DoRA's): mix ≥ 0.9× all-LoRA tokens/s.

    .venv/bin/python benchmarks/embedding_kinds_serving.py --preset cpu     # small Llama-shaped model, fp32
    .venv/bin/python benchmarks/embedding_kinds_serving.py --preset gpu

Models and adapters are random (no downloads); the helpers are those of ``benchmarks/serving.py``. Results go
to ``benchmarks/results/embedding-kinds-serving-<preset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from serving import PRESETS, Preset, interleaved, make_adapter, make_base, stream_timer

from adapterhub_local.inference import Engine
from adapterhub_local.registry import CardInfo, Registry

KIND_ADAPTERS = 8
TOKENS = 16
EMBED = "base_model.model.model.embed_tokens"


def make_kind(path: Path, p: Preset, rank: int, seed: int, tokens: bool) -> Path:
    """A LoRA directory (q, k, v, o) plus an embedding LoRA of the same rank, or ``TOKENS`` trainable tokens."""
    make_adapter(path, p, rank, seed)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(10_000 + seed)
    config = json.loads((path / "adapter_config.json").read_text())
    if tokens:
        tensors[f"{EMBED}.token_adapter.trainable_tokens_delta"] = torch.randn(TOKENS, p.hidden, generator=generator)
        config["trainable_token_indices"] = torch.randperm(p.vocab, generator=generator)[:TOKENS].tolist()
    else:
        tensors[f"{EMBED}.lora_embedding_A"] = torch.randn(rank, p.vocab, generator=generator)
        tensors[f"{EMBED}.lora_embedding_B"] = torch.randn(p.hidden, rank, generator=generator) * 0.01
        config["target_modules"] = [*config["target_modules"], "embed_tokens"]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def run(preset_name: str, repeats: int | None, new: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kinds-bench-") as tmp:  # its weights go with it
        return run_in(Path(tmp), preset_name, repeats, new)


def run_in(work: Path, preset_name: str, repeats: int | None, new: int | None) -> dict[str, Any]:
    p = PRESETS[preset_name]
    if repeats is not None:
        p.repeats = repeats
    if new is not None:
        p.new = new
    dtype = getattr(torch, p.dtype)
    registry = Registry(work / "registry")
    registry.add_base("bench", str(make_base(work / "base", p)))
    lora = [f"l{i}" for i in range(p.adapters)]
    kinds = [f"k{i}" for i in range(KIND_ADAPTERS)]
    for i, name in enumerate(lora):
        registry.register_adapter(name, make_adapter(work / name, p, p.rank, i), "bench",
                                  CardInfo(task_type="causal_lm"))
    for i, name in enumerate(kinds):
        registry.register_adapter(name, make_kind(work / name, p, p.rank, 100 + i, tokens=i % 2 == 1), "bench",
                                  CardInfo(task_type="causal_lm"))
    torch.manual_seed(1)
    prompts = torch.randint(3, p.vocab, (p.rows, p.prompt)).tolist()
    engine = Engine(registry, "bench", mode="swap", pool_bytes=8 << 30, device=p.device, dtype=dtype)

    def generate(refs: list[str]) -> Callable[[], tuple[float, float]]:
        return stream_timer(engine, prompts, refs, p.new, p.device)

    all_lora = [lora[i % len(lora)] for i in range(p.rows)]
    # every fourth row an embedding kind (alternating embedding LoRA / trainable tokens) + 24 LoRA adapters
    mixed = [kinds[i // 4] if i % 4 == 0 else lora[i - i // 4 - 1] for i in range(p.rows)]
    assert len(set(mixed)) == p.rows == 32 and sum(r.startswith("k") for r in mixed) == KIND_ADAPTERS
    systems = {"all_lora": generate(all_lora), "kinds_mix": generate(mixed)}
    timings = interleaved(systems, p)
    ratio = timings["kinds_mix"]["tokens_per_s"] / timings["all_lora"]["tokens_per_s"]
    median_ratio = timings["kinds_mix"]["median_tokens_per_s"] / timings["all_lora"]["median_tokens_per_s"]
    return {"preset": preset_name, "rows": p.rows, "prompt": p.prompt, "new": p.new, "rank": p.rank,
            "dtype": p.dtype, "device": p.device, "decoder": engine.decoder,
            "strategy": engine.runner.context.strategy, "repeats": p.repeats, "timings": timings,
            "kinds_over_lora": ratio, "kinds_over_lora_median": median_ratio, "target": 0.9,
            "meets_target": ratio >= 0.9,
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


def markdown(r: dict[str, Any]) -> str:
    rows = [f"| {name} | {t['tokens_per_s']:.0f} | {t['median_tokens_per_s']:.0f} | {t['spread']:.2f} |"
            for name, t in r["timings"].items()]
    return "\n".join([
        f"Embedding-kind serving, preset {r['preset']} ({r['device']}, {r['dtype']}, decoder {r['decoder']}, strategy "
        f"{r['strategy']}): {r['rows']} rows × ({r['prompt']} + {r['new']}) tokens, rank {r['rank']}",
        "", "| batch | decode tok/s (best) | median | spread |", "|---|---:|---:|---:|", *rows, "",
        f"4 embedding-LoRA + 4 trainable-token + 24 LoRA / 32 LoRA = **{r['kinds_over_lora']:.3f}×** best of "
        f"{r['repeats']} ({r['kinds_over_lora_median']:.3f}× median; target ≥ 0.9: "
        f"{'met' if r['meets_target'] else 'NOT met'}); "
        f"load average {tuple(round(x, 2) for x in r['machine']['loadavg'])}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--new", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.preset, args.repeats, args.new)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"embedding-kinds-serving-{args.preset}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / f"embedding-kinds-serving-{args.preset}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
