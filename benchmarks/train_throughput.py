"""Training throughput: our runner's loop against Hugging Face ``Trainer`` + PEFT, same model, data, batch
size and sequence lengths, in one run. Reports real (non-padding) tokens/s and peak memory, and ratios.

Each side runs in its own subprocess so its peak memory is its own (CUDA: max allocated; CPU: the
process's max RSS). Data: random token sequences with lengths uniform in [min_len, max_len], loss on every
token, LoRA on q_proj/v_proj. Ours runs twice: with the same plain batching as ``Trainer`` and with
``group_by_length`` (less padding); the first is the like-for-like comparison.

    .venv/bin/python benchmarks/train_throughput.py                      # SmolLM2-135M shape, random init
    .venv/bin/python benchmarks/train_throughput.py --model tiny --steps 10   # seconds, a smoke test

Writes ``benchmarks/results/train_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def make_model(kind: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "tiny":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:  # SmolLM2-135M's shape
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True)
    model: Any = LlamaForCausalLM(config)
    return model.to("cuda") if torch.cuda.is_available() else model


def make_data(n: int, vocab: int, min_len: int, max_len: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in lengths]


def lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


class TokenMeter:
    """Counts non-padding tokens seen by forward passes after ``start_after`` passes."""

    def __init__(self, model: Any, start_after: int) -> None:
        self.calls = 0
        self.tokens = 0
        self.started: float | None = None
        self.ended: float | None = None
        self.start_after = start_after
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        self.calls += 1
        if self.calls == self.start_after + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()
        if self.calls > self.start_after:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else int(kwargs["input_ids"].numel())

    def step_end(self) -> None:
        """Called after every optimizer step; the last call marks the end of the measured window."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ended = time.perf_counter()

    def result(self) -> dict[str, Any]:
        assert self.started is not None and self.ended is not None
        return {"tokens": self.tokens, "seconds": self.ended - self.started}


def run_trainer(args: argparse.Namespace, data: list[list[int]]) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = lora(make_model(args.model))
    meter = TokenMeter(model, args.warmup)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return {"input_ids": data[i]}

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = ids[i, :n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps + args.warmup,
            learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, logging_strategy="no",
            save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0,
            remove_unused_columns=False, seed=0, disable_tqdm=True,
        )
        class StepEnd(TrainerCallback):
            def on_step_end(self, *a: Any, **k: Any) -> None:
                meter.step_end()

        trainer = Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate,
                          callbacks=[StepEnd()])
        trainer.train()
    return meter.result()


def run_ours(args: argparse.Namespace, data: list[list[int]], grouped: bool) -> dict[str, Any]:
    from adapterhub_local.config import TrainConfig
    from adapterhub_local.train.loop import train_loop
    from adapterhub_local.train.tasks import Example, collate_generation

    model = lora(make_model(args.model))
    meter = TokenMeter(model, args.warmup)
    examples = [Example(ids, list(ids)) for ids in data]
    cfg = TrainConfig(lr=2e-4, batch_size=args.batch_size, max_steps=args.steps + args.warmup, warmup_ratio=0.0,
                      eval_every=10**9, log_every=10**9, group_by_length=grouped, max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as run_dir:
        train_loop(model, examples, lambda ex: collate_generation(ex, 0), cfg, Path(run_dir), lambda m: {},
                   "none", True, progress=False, on_step=lambda step: meter.step_end())
    return meter.result()


def side(args: argparse.Namespace) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    vocab = 512 if args.model == "tiny" else 49152
    data = make_data((args.steps + args.warmup) * args.batch_size, vocab, args.min_len, args.max_len)
    if args.side == "trainer":
        out = run_trainer(args, data)
    else:
        out = run_ours(args, data, grouped=args.side == "ours_grouped")
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    if torch.cuda.is_available():
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_memory_kind"] = "cuda_max_allocated"
    else:
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_memory_kind"] = "process_max_rss"
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2-shape", "tiny"], default="smollm2-shape")
    parser.add_argument("--steps", type=int, default=12, help="Measured optimizer steps per side.")
    parser.add_argument("--warmup", type=int, default=2, help="Unmeasured steps first.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=100)
    parser.add_argument("--side", choices=["trainer", "ours", "ours_grouped"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    results: dict[str, Any] = {}
    for name in ("trainer", "ours", "ours_grouped"):
        cmd = [sys.executable, __file__, "--side", name, "--model", args.model, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--min-len", str(args.min_len),
               "--max-len", str(args.max_len)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1][len("RESULT "):])
        print(name, results[name], flush=True)
    base = results["trainer"]
    for name in ("ours", "ours_grouped"):
        results[name]["tokens_per_s_ratio"] = results[name]["tokens_per_s"] / base["tokens_per_s"]
        results[name]["peak_memory_ratio"] = results[name]["peak_memory_mb"] / base["peak_memory_mb"]
    meta = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
            "lengths": [args.min_len, args.max_len], "lora": "r=8 on q_proj,v_proj",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "python": platform.python_version(),
            "precision": "bf16" if torch.cuda.is_available() else "fp32",
            "command": " ".join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    rows = ["| loop | real tokens/s | × Trainer | peak memory (MB) | × Trainer |", "|---|---|---|---|---|"]
    labels = {"trainer": "HF Trainer + PEFT", "ours": "adapterhub loop (same batching)",
              "ours_grouped": "adapterhub loop, group_by_length"}
    for name, label in labels.items():
        r = results[name]
        rows.append(f"| {label} | {r['tokens_per_s']:.0f} | {r.get('tokens_per_s_ratio', 1.0):.2f} | "
                    f"{r['peak_memory_mb']:.0f} | {r.get('peak_memory_ratio', 1.0):.2f} |")
    text = (f"# Training throughput\n\n`{meta['command']}` — {meta['model']}, {meta['device']}, "
            f"{meta['precision']}, batch {args.batch_size}, lengths {args.min_len}–{args.max_len}, "
            f"{args.steps} measured steps after {args.warmup} warm-up steps, LoRA {meta['lora']}; "
            f"peak memory = {results['trainer']['peak_memory_kind']}.\n\n" + "\n".join(rows) + "\n")
    (RESULTS / "train_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
