"""Training throughput: our runner's loop against Hugging Face ``Trainer`` + PEFT, fp32 and bf16, same model, data,
batch size and sequence lengths, in one run. Reports real (non-padding) tokens/s, "% of bound" and peak memory.

Sides: ``trainer_fp32`` (Trainer + PEFT, fp32), ``trainer_bf16`` (Trainer + PEFT with ``bf16=True``: autocast
over fp32 weights), ``ours_fp32`` (our loop, ``precision: fp32``), ``ours_bf16`` (our loop, ``precision: bf16``:
bf16 frozen base, fp32 LoRA and optimizer state), ``ours_bf16_grouped`` (the same with ``group_by_length``) and
``ours_bf16_compiled`` (the loop as a run trains by default on a CPU: ``train.compile: true`` — the decoder blocks
under ``torch.compile``; the warm-up steps absorb the compilation, see ``train/compilation.py`` for its one-off cost
— and padding-free batches, ``train/padding_free.py``), ``ours_bf16_compiled_padded`` (the same with padded
batches) and ``ours_bf16_compiled_torch_loss`` (the default with torch's cross entropy).
The first four (and ``ours_bf16_compiled_padded``) use the same padded batches, so they compare like for like;
padding-free batches hold the same examples and compute the same loss without the padding positions. Each side
runs in its own subprocess so its peak memory is its own (CUDA: max allocated; CPU: the process's max RSS), with the
thread count pinned; sides are interleaved over ``--rounds`` rounds and each reports its best and median,
and its ratio to each Trainer side round by round (the median of those is the figure least moved by the host's
drift between rounds).

"% of bound": the GEMM FLOP/s of the side's compute dtype (a square matmul measured in the same run, each round)
over the model FLOPs a trained token needs (frozen base: forward 2·P plus activation backward 2·P for the P
matmul parameters, LoRA's own and attention's matmuls added) — the tokens/s the machine could reach at its
measured matmul speed.

    .venv/bin/python benchmarks/train_throughput.py                          # SmolLM2-135M shape, random init
    .venv/bin/python benchmarks/train_throughput.py --model tiny --steps 4 --rounds 1   # seconds, a smoke test

Writes ``benchmarks/results/train_throughput.{json,md}``.
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

# Passive OpenMP waiting for every side (this process and the subprocesses inherit it), set before torch loads:
# the comparison is of loops and precisions, not of OpenMP settings (see adapterhub_local/runtime.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapterhub_local.runtime import prepare_openmp_env

prepare_openmp_env()

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("trainer_fp32", "trainer_bf16", "ours_fp32", "ours_bf16", "ours_bf16_grouped", "ours_bf16_compiled",
         "ours_bf16_compiled_padded", "ours_bf16_compiled_torch_loss")
LABELS = {"trainer_fp32": "HF Trainer + PEFT, fp32", "trainer_bf16": "HF Trainer + PEFT, bf16 autocast",
          "ours_fp32": "adapterhub loop, fp32", "ours_bf16": "adapterhub loop, bf16 base + fp32 LoRA",
          "ours_bf16_grouped": "adapterhub loop, bf16, group_by_length",
          "ours_bf16_compiled": "adapterhub loop, bf16, train.compile: true, padding-free batches (the defaults)",
          "ours_bf16_compiled_padded": "the same with padded batches (train.padding_free: false)",
          "ours_bf16_compiled_torch_loss": "the same with torch's cross entropy (before train/chunked_ce.py)"}
COMPUTE_DTYPE = {"trainer_fp32": "fp32", "ours_fp32": "fp32", "trainer_bf16": "bf16", "ours_bf16": "bf16",
                 "ours_bf16_grouped": "bf16", "ours_bf16_compiled": "bf16", "ours_bf16_compiled_padded": "bf16",
                 "ours_bf16_compiled_torch_loss": "bf16"}
LORA_R = 8
LORA_TARGETS = ["q_proj", "v_proj"]


def model_config(kind: str) -> Any:
    from transformers import LlamaConfig

    if kind == "tiny":
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    # SmolLM2-135M's shape
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def make_model(kind: str, dtype: torch.dtype = torch.float32) -> Any:
    """A random-init model built directly in ``dtype`` (so a bf16 side never holds an fp32 copy)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM._from_config(model_config(kind), dtype=dtype)
    return model.to("cuda") if torch.cuda.is_available() else model


def flops_per_token(kind: str, mean_len: float) -> float:
    """Training FLOPs per token with a frozen base: linear layers 2·P forward + 2·P activation backward; attention
    score and value matmuls 4·T·hidden per layer forward, twice that backward; LoRA 6·r·(d_in + d_out) per module."""
    c = model_config(kind)
    head = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head
    per_layer = c.hidden_size * (c.hidden_size + 2 * kv + c.hidden_size) + 3 * c.hidden_size * c.intermediate_size
    linear = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + LM head
    attention = 4 * mean_len * c.hidden_size * c.num_hidden_layers
    lora = c.num_hidden_layers * 6 * LORA_R * ((c.hidden_size + c.hidden_size) + (c.hidden_size + kv))
    return 4 * linear + 3 * attention + lora


def gemm_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an n×n×n matmul in ``dtype`` (the compute bound of this run)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def make_data(n: int, vocab: int, min_len: int, max_len: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in lengths]


def lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))
class TokenMeter:
    """Counts non-padding tokens seen by forward passes after ``start_after`` passes."""

    def __init__(self, model: Any, start_after: int) -> None:
        self.calls = 0
        self.tokens = 0
        self.started: float | None = None
        self.ended: float | None = None
        self.start_after = start_after
        # On the decoder, not the PEFT wrapper: our loop calls the decoder and the LM head itself.
        model.get_base_model().model.register_forward_pre_hook(self._hook, with_kwargs=True)

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


def run_trainer(args: argparse.Namespace, data: list[list[int]], bf16: bool) -> dict[str, Any]:
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
            save_strategy="no", report_to=[], bf16=bf16, use_cpu=not cuda, dataloader_num_workers=0,
            remove_unused_columns=False, seed=0, disable_tqdm=True,
        )
        class StepEnd(TrainerCallback):
            def on_step_end(self, *a: Any, **k: Any) -> None:
                meter.step_end()

        trainer = Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate,
                          callbacks=[StepEnd()])
        trainer.train()
    return meter.result()


def torch_token_losses(hidden: torch.Tensor, tokens: torch.Tensor, head: Any) -> torch.Tensor:
    """The loop's per-token loss as it was before ``train/chunked_ce.py``: torch's cross entropy on all the
    labelled logits at once (under CPU autocast: an fp32 copy of them, its log-softmax kept for the backward)."""
    return torch.nn.functional.cross_entropy(head(hidden), tokens, reduction="none").float()


def run_ours(args: argparse.Namespace, data: list[list[int]], precision: str, grouped: bool,
             compiled: bool = False, torch_loss: bool = False, padding_free: bool = False) -> dict[str, Any]:
    from adapterhub_local import runtime
    from adapterhub_local.config import AutoSwitch, TrainConfig
    from adapterhub_local.decode_attention import use_decode_attention
    from adapterhub_local.train import lm_loss
    from adapterhub_local.train.loop import train_loop
    from adapterhub_local.train.tasks import Example, collate_generation

    if torch_loss:  # this side's own process: the A/B of the loss alone
        lm_loss.token_losses = torch_token_losses

    # As the runner loads a frozen base: in the precision's dtype (bf16 here), LoRA and optimizer fp32.
    base = make_model(args.model, runtime.base_dtype(precision))
    use_decode_attention(base)  # as models.load_base_model does
    model = lora(base)
    meter = TokenMeter(model, args.warmup)
    examples = [Example(ids, list(ids)) for ids in data]
    cfg = TrainConfig(lr=2e-4, batch_size=args.batch_size, max_steps=args.steps + args.warmup, warmup_ratio=0.0,
                      eval_every=10**9, log_every=10**9, group_by_length=grouped, max_grad_norm=1.0,
                      precision=precision, compile=AutoSwitch("true" if compiled else "false"),
                      padding_free=AutoSwitch("true" if padding_free else "false"))
    with tempfile.TemporaryDirectory() as run_dir:
        train_loop(model, examples, lambda ex: collate_generation(ex, 0), cfg, Path(run_dir), lambda m: {},
                   "none", True, progress=False, on_step=lambda step: meter.step_end())
    return meter.result()


def side(args: argparse.Namespace) -> None:
    from adapterhub_local import runtime

    runtime.configure_threads(args.threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    vocab = 512 if args.model == "tiny" else 49152
    data = make_data((args.steps + args.warmup) * args.batch_size, vocab, args.min_len, args.max_len)
    if args.side.startswith("trainer"):
        out = run_trainer(args, data, bf16=args.side == "trainer_bf16")
    else:
        out = run_ours(args, data, COMPUTE_DTYPE[args.side], grouped=args.side.endswith("grouped"),
                       compiled="compiled" in args.side, torch_loss=args.side.endswith("torch_loss"),
                       padding_free=args.side in ("ours_bf16_compiled", "ours_bf16_compiled_torch_loss"))
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_memory_kind"] = "cuda_max_allocated"
    else:
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_memory_kind"] = "process_max_rss"
    print("RESULT " + json.dumps(out))


def _run_side(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", name, "--model", args.model, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--min-len", str(args.min_len),
           "--max-len", str(args.max_len), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(line[-1][len("RESULT "):])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2-shape", "tiny"], default="smollm2-shape")
    parser.add_argument("--steps", type=int, default=8, help="Measured optimizer steps per side and round.")
    parser.add_argument("--warmup", type=int, default=2, help="Unmeasured steps first.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds (every side once per round).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=100)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ADAPTERHUB_THREADS") or 2),
                        help="torch threads of every side (pinned; default $ADAPTERHUB_THREADS or 2).")
    parser.add_argument("--sides", default=",".join(SIDES), help="Comma-separated subset of " + ", ".join(SIDES))
    parser.add_argument("--name", default="train_throughput",
                        help="Results file stem under benchmarks/results (default: train_throughput).")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--rewrite-report", action="store_true",
                        help="Run nothing: rewrite benchmarks/results/<name>.{json,md} from the stored JSON's "
                             "measurements (after a change to the report's ratios or layout).")
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    if args.rewrite_report:
        stored = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_report(args.name, stored["meta"], stored["results"])
        return
    from adapterhub_local import runtime

    runtime.configure_threads(args.threads)
    sides = [s for s in args.sides.split(",") if s]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    gemm: dict[str, list[float]] = {"fp32": [], "bf16": []}
    load: list[float] = []
    for round_ in range(args.rounds):
        gemm["fp32"].append(gemm_flops(torch.float32))
        gemm["bf16"].append(gemm_flops(torch.bfloat16))
        for name in sides:
            runs[name].append(_run_side(name, args))
            load.append(os.getloadavg()[0])
            print(f"round {round_ + 1}: {name} {runs[name][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    bound_flops = {k: max(v) for k, v in gemm.items()}
    mean_len = (args.min_len + args.max_len) / 2
    per_token = flops_per_token(args.model, mean_len)
    results: dict[str, Any] = {}
    for name in sides:
        rates = [r["tokens_per_s"] for r in runs[name]]
        bound = bound_flops[COMPUTE_DTYPE[name]] / per_token
        results[name] = {"tokens_per_s_best": max(rates), "tokens_per_s_median": statistics.median(rates),
                         "tokens_per_s_rounds": rates, "bound_tokens_per_s": bound,
                         "pct_of_bound": 100 * max(rates) / bound,
                         "peak_memory_mb": max(r["peak_memory_mb"] for r in runs[name]),
                         "peak_memory_kind": runs[name][0]["peak_memory_kind"], "threads": runs[name][0]["threads"]}
    meta = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "batch_size": args.batch_size, "lengths": [args.min_len, args.max_len],
            "lora": f"r={LORA_R} on {','.join(LORA_TARGETS)}", "threads": args.threads,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "python": platform.python_version(),
            "gemm_flops_best": bound_flops, "gemm_flops_rounds": gemm, "flops_per_token": per_token,
            "load_average_after_each_side": load,
            "command": " ".join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]])}
    write_report(args.name, meta, results)


def paired_ratios(entry: dict[str, Any], ref: dict[str, Any]) -> list[float]:
    """``entry``'s tokens/s over ``ref``'s, round by round: the two ran minutes apart in each round, so the
    machine's drift between rounds (±15 % on a shared 2-core host) cancels out of each ratio."""
    return [a / b for a, b in zip(entry["tokens_per_s_rounds"], ref["tokens_per_s_rounds"], strict=True)]


def write_report(name: str, meta: dict[str, Any], results: dict[str, Any]) -> None:
    """Add the ratios against the Trainer sides to ``results`` and write ``benchmarks/results/<name>.{json,md}``."""
    for ref in ("trainer_fp32", "trainer_bf16"):
        if ref not in results:
            continue
        for entry in results.values():
            entry[f"x_{ref}"] = entry["tokens_per_s_best"] / results[ref]["tokens_per_s_best"]
            entry[f"x_{ref}_median"] = entry["tokens_per_s_median"] / results[ref]["tokens_per_s_median"]
            entry[f"x_{ref}_rounds"] = paired_ratios(entry, results[ref])
            entry[f"x_{ref}_rounds_median"] = statistics.median(entry[f"x_{ref}_rounds"])
            entry[f"peak_memory_x_{ref}"] = entry["peak_memory_mb"] / results[ref]["peak_memory_mb"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    ref_names = [r for r in ("trainer_fp32", "trainer_bf16") if r in results]
    head = "| loop | tokens/s best | median | % of bound | " + " | ".join(
        f"× {r} (best / median / per round, median)" for r in ref_names)
    rows = [head + " | peak memory (MB) | × trainer_fp32 memory |",
            "|---" * (6 + len(ref_names)) + "|"]
    for side_name, r in results.items():
        ratios = " | ".join(f"{r[f'x_{ref}']:.2f} / {r[f'x_{ref}_median']:.2f} / {r[f'x_{ref}_rounds_median']:.2f}"
                            for ref in ref_names)
        mem = f"{r['peak_memory_x_trainer_fp32']:.2f}" if "trainer_fp32" in results else "–"
        rows.append(f"| {LABELS[side_name]} | {r['tokens_per_s_best']:.0f} | {r['tokens_per_s_median']:.0f} | "
                    f"{r['pct_of_bound']:.0f}% | {ratios} | {r['peak_memory_mb']:.0f} | {mem} |")
    per_round = [f"{LABELS[n]}: " + ", ".join(f"{x:.2f}" for x in r["x_trainer_fp32_rounds"])
                 for n, r in results.items() if "x_trainer_fp32_rounds" in r and n != "trainer_fp32"]
    load = meta["load_average_after_each_side"]
    bound_flops = meta["gemm_flops_best"]
    lengths = meta["lengths"]
    text = (f"# Training throughput\n\n`{meta['command']}` — {meta['model']}, {meta['device']}, "
            f"{meta['threads']} threads, batch {meta['batch_size']}, lengths {lengths[0]}–{lengths[1]}, "
            f"{meta['steps']} measured steps after {meta['warmup']} warm-up steps, {meta['rounds']} interleaved "
            f"rounds, LoRA {meta['lora']}; real (non-padding) "
            f"tokens/s; peak memory = {next(iter(results.values()))['peak_memory_kind']}. Bound = measured GEMM "
            f"(fp32 {bound_flops['fp32'] / 1e9:.0f}, bf16 {bound_flops['bf16'] / 1e9:.0f} GFLOP/s) / "
            f"{meta['flops_per_token'] / 1e6:.0f} MFLOP per trained token. Load average during the run: "
            f"{min(load):.1f}–{max(load):.1f} (this benchmark's own threads included). Ratios: best over best, "
            f"median over median, and the median of the round-by-round ratios (each round's sides ran minutes "
            f"apart).\n\n"
            + "\n".join(rows) + "\n")
    if per_round:
        text += "\n× trainer_fp32 round by round — " + "; ".join(per_round) + ".\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
