"""Serving benchmark: multi-adapter decode vs the engine's own base, PEFT's mixed batch and HF ``generate``;
merged mode vs base; cold adapter load to first token; merge switch time; the memory-bandwidth bound.

Every figure comes from one run on one machine, side by side, with ratios against baselines measured in
the same run. Models are Llama-shaped with random weights (no downloads); adapters are random rank-r LoRA
on q, k, v, o written as PEFT directories and registered in a temporary registry.

    .venv/bin/python benchmarks/serving.py                         # SmolLM2-135M shape, CPU (the default)
    .venv/bin/python benchmarks/serving.py --preset cpu            # small model, fp32, CPU (minutes)
    .venv/bin/python benchmarks/serving.py --preset gpu            # ~1B, bf16, 32 rows x (128 + 128) tokens

The ``smollm2`` preset is SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate
1536, vocab 49152, tied embeddings) in bf16 where the CPU multiplies bf16 natively (else fp32), with HF
``generate`` in fp32 beside it as the baseline. Besides the one-shot ``generate`` path, every preset times
the server's default path: an open batch (continuous batching) that all rows join, which decodes on the
static slab (a replayed CUDA graph on GPUs).

Each table row has a bound: the smaller of the bandwidth bound (rows × copy bandwidth / bytes one step
reads) and the compute bound (a square GEMM's FLOP/s in the preset's dtype / FLOPs per token), both
measured in the same run, and the row's "% of bound".

Decode throughput is ``rows·(N-1)`` tokens over the time from the first new token to the last (the prefill
and first token excluded), timed the same way for every system (the engine's stream, a Hugging Face
streamer). Results go to
``benchmarks/results/serving-<preset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapterhub_local.decode_attention import IMPLEMENTATIONS
from adapterhub_local.inference import Engine, Request, SamplingParams, cpu_lora_kernel, packed_linear
from adapterhub_local.registry import CardInfo, Registry

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rows: int
    prompt: int
    new: int
    dtype: str
    device: str
    adapters: int = 32
    rank: int = 16
    cold_ranks: tuple[int, ...] = (16, 256)
    repeats: int = 3
    tie: bool = False
    """Tied input/output embeddings (SmolLM2): the LM head reads the embedding table every step."""
    fp32_baseline: bool = False
    """Also time HF ``generate`` in fp32 (the baseline when the engine runs bf16 on a CPU)."""


def cpu_dtype() -> str:
    """bf16 where the CPU multiplies it natively (AMX / AVX512-BF16), else fp32."""
    from adapterhub_local.runtime import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


PRESETS = {
    "smollm2": Preset(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, rows=32, prompt=64,
                      new=64, dtype=cpu_dtype(), device="cpu", repeats=3, cold_ranks=(16,), tie=True,
                      fp32_baseline=True),
    "cpu": Preset(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=688, vocab=2048, rows=32, prompt=32, new=32,
                  dtype="float32", device="cpu", repeats=5),
    "gpu": Preset(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, rows=32, prompt=128,
                  new=128, dtype="bfloat16", device="cuda", repeats=3),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_base(path: Path, p: Preset) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                         num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                         max_position_embeddings=max(512, 2 * (p.prompt + p.new)), bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=p.tie)
    model = LlamaForCausalLM(config).to(getattr(torch, p.dtype))
    model.save_pretrained(path)
    return path


def make_adapter(path: Path, p: Preset, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory on q, k, v, o of every layer, random A and B (fp32, as training writes them)."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = p.hidden // p.heads
    out_dims = {"q_proj": p.hidden, "k_proj": p.kv_heads * head_dim, "v_proj": p.kv_heads * head_dim,
                "o_proj": p.hidden}
    tensors = {}
    for layer in range(p.layers):
        for module in ATTN:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, p.hidden, generator=generator) / p.hidden ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dims[module], rank, generator=generator) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(ATTN), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def measure_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 5)
    return 2 * nbytes / seconds


def step_weights(p: Preset, model: Any) -> int:
    """Weights one decode step multiplies: all but the input embedding table (looked up, not read whole),
    plus the LM head, which is that table when the embeddings are tied."""
    weights = sum(t.numel() for n, t in model.named_parameters() if "embed_tokens" not in n)
    return weights + (p.vocab * p.hidden if p.tie else 0)


def measure_gemm(device: str, dtype: torch.dtype, size: int = 2048) -> float:
    """FLOP/s of a square matmul in ``dtype`` (the compute bound's yardstick, measured in the same run)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = timed(lambda: a @ b, device, 5)
    return 2 * size ** 3 / seconds


def token_flops(p: Preset, model: Any, rank: int) -> float:
    """FLOPs per generated token: 2 per weight, attention over the mean context, LoRA on q, k, v, o."""
    head_dim = p.hidden // p.heads
    attention = 4 * p.layers * p.heads * head_dim * (p.prompt + p.new / 2)
    lora = 2 * p.layers * rank * (4 * p.hidden + 2 * p.hidden + 2 * p.kv_heads * head_dim)
    return 2 * step_weights(p, model) + attention + lora


def step_bytes(p: Preset, model: Any, adapter_bytes: int, element: int) -> float:
    """Bytes one decode step must read: the weights it multiplies, the mean KV cache, adapters."""
    weights = step_weights(p, model) * element
    head_dim = p.hidden // p.heads
    mean_len = p.prompt + p.new / 2
    kv = 2 * p.layers * p.kv_heads * head_dim * mean_len * p.rows * element
    return weights + kv + adapter_bytes


class FirstToken:
    """A Hugging Face streamer that notes when the first new token arrives (its first ``put`` is the prompt)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            sync(self.device)
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def stream_timer(engine: Engine, prompts: list[list[int]], refs: Sequence[str | None], new: int,
                 device: str) -> Callable[[], tuple[float, float]]:
    """A timed greedy decode of ``prompts`` (row i with adapter ``refs[i]``, ``new`` tokens each, no early stop):
    returns (seconds to the first step's events, that is prefill + first token; seconds in all)."""
    requests = [Request(prompt=ids, adapter=ref, sampling=SamplingParams(max_new_tokens=new, stop_at_eos=False))
                for ids, ref in zip(prompts, refs, strict=True)]

    def go() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        first = None
        for _ in engine.generate_stream(requests):
            if first is None:  # events of the first step arrive after the prefill and the first token
                sync(device)
                first = time.perf_counter()
        sync(device)
        assert first is not None
        return first - start, time.perf_counter() - start
    return go


def interleaved(systems: dict[str, Callable[[], tuple[float, float]]], p: Preset) -> dict[str, dict[str, float]]:
    """Run every system once to warm up, then ``p.repeats`` rounds, one run of each system per round, so load
    from other processes hits all systems alike. Each run generates ``p.new`` tokens per row and returns
    (first-token time, end time) from its start; decode throughput = rows·(new-1) / (end - first), median."""
    for run_once in systems.values():
        run_once()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    for _ in range(p.repeats):
        for name, run_once in systems.items():
            samples[name].append(run_once())
    out = {}
    tokens = p.rows * (p.new - 1)
    for name, runs in samples.items():
        decode = [end - first for first, end in runs]
        # best of N: interference from other processes only ever adds time
        out[name] = {"tokens_per_s": tokens / min(decode), "median_tokens_per_s": tokens / statistics.median(decode),
                     "decode_s": min(decode), "first_token_s": min(first for first, _ in runs),
                     "spread": max(decode) / min(decode)}
    return out


def run(preset_name: str, out_dir: Path, only_fast: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:  # its weights go with it
        return run_in(Path(tmp), preset_name, out_dir, only_fast)


def run_in(work: Path, preset_name: str, out_dir: Path, only_fast: bool) -> dict[str, Any]:
    p = PRESETS[preset_name]
    dtype = getattr(torch, p.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    registry = Registry(work / "registry")
    registry.add_base("bench", str(make_base(work / "base", p)))
    names = [f"a{i}" for i in range(p.adapters)]
    for i, name in enumerate(names):
        registry.register_adapter(name, make_adapter(work / name, p, p.rank, i), "bench",
                                  CardInfo(task_type="causal_lm"))
    for rank in p.cold_ranks:
        registry.register_adapter(f"cold{rank}", make_adapter(work / f"cold{rank}", p, rank, 1000 + rank), "bench",
                                  CardInfo(task_type="causal_lm"))
    torch.manual_seed(1)
    prompts = torch.randint(3, p.vocab, (p.rows, p.prompt)).tolist()
    engine = Engine(registry, "bench", mode="swap", pool_bytes=8 << 30, device=p.device, dtype=dtype)
    results: dict[str, Any] = {}

    def engine_gen(refs: list[str | None], on: Engine = engine) -> Callable[[], tuple[float, float]]:
        return stream_timer(on, prompts, refs, p.new, p.device)

    def open_batch_gen(refs: list[str | None], on: Engine = engine) -> Callable[[], tuple[float, float]]:
        """The server's default path: every row joins an open batch (continuous batching), stepped to the end."""
        requests = [Request(prompt=ids, adapter=ref, sampling=SamplingParams(max_new_tokens=p.new, stop_at_eos=False))
                    for ids, ref in zip(prompts, refs, strict=True)]

        def go() -> tuple[float, float]:
            sync(p.device)
            start = time.perf_counter()
            first = None
            batch = on.open_batch(max_rows=p.rows)
            batch.join(requests, list(range(p.rows)))
            while batch:
                batch.step()
                if first is None:  # the first step is the prefill and every row's first token
                    sync(p.device)
                    first = time.perf_counter()
            batch.close()
            sync(p.device)
            assert first is not None
            return first - start, time.perf_counter() - start
        return go

    mixed: list[str | None] = [names[i % len(names)] for i in range(p.rows)]
    systems: dict[str, Callable[[], tuple[float, float]]] = {}
    one: list[str | None] = [names[0]] * p.rows
    adapters_run, base_run, merged_run = engine_gen(mixed), engine_gen([None] * p.rows), engine_gen(one)

    def in_mode(mode: str, run_once: Callable[[], tuple[float, float]]) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            engine.set_mode(mode)  # type: ignore[arg-type]
            if mode == "merge":
                engine.merge(names[0])
            return run_once()
        return go

    def switched_off(suspension: Callable[[], AbstractContextManager[None]],
                     run_once: Callable[[], tuple[float, float]]) -> Callable[[], tuple[float, float]]:
        """``run_once`` with one of the engine's CPU fast paths off (the same engine: the side-by-side baseline)."""
        def go() -> tuple[float, float]:
            with suspension():
                return run_once()
        return go

    systems["engine_base"] = in_mode("swap", base_run)
    systems["engine_adapters"] = in_mode("swap", adapters_run)
    systems["engine_merged"] = in_mode("merge", merged_run)
    systems["open_batch_base"] = in_mode("swap", open_batch_gen([None] * p.rows))
    systems["open_batch_adapters"] = in_mode("swap", open_batch_gen(mixed))
    results["open_batch_decoder"] = engine.continuous_decoder
    other = "gather" if engine.runner.context.strategy == "dense" else "dense"
    engine_other = Engine(registry, "bench", mode="swap", pool_bytes=8 << 30, device=p.device, dtype=dtype,
                          lora_strategy=other)
    systems[f"engine_adapters_{other}"] = engine_gen(mixed, engine_other)
    results["strategy"] = {"default": engine.runner.context.strategy, "other": other}

    # the CPU decode kernel against torch's bmm on the same engine (the kernel is ours: show that it pays)
    results["cpu_lora_kernel"] = (cpu_lora_kernel.unavailable_reason() or "used") if p.device == "cpu" else None
    if p.device == "cpu" and cpu_lora_kernel.available():
        systems["engine_adapters_torch_bmm"] = in_mode("swap", switched_off(cpu_lora_kernel.suspended, adapters_run))

    # prepacked bf16 weights against oneDNN's per-call reorder on the same engine (ours: show that it pays)
    results["packed_weights"] = {"linears": engine.runner.packed_linears, "bytes": engine.packed_weight_bytes,
                                 "off_because": packed_linear.unavailable_reason() if p.device == "cpu" else None}
    if engine.runner.packed_linears:
        systems["engine_base_unpacked"] = in_mode("swap", switched_off(packed_linear.suspended, base_run))

    # the C decode-attention kernel against torch's packed call on the same engine (ours: show that it pays)
    results["attention_kernel"] = ("used" if cpu_lora_kernel.attention_function() is not None else
                                   cpu_lora_kernel.unavailable_reason()) if p.device == "cpu" else None
    if p.device == "cpu" and cpu_lora_kernel.attention_function() is not None:
        systems["engine_base_torch_attention"] = in_mode("swap", switched_off(cpu_lora_kernel.attention_suspended,
                                                                               base_run))

    # the CPU decode-step attention against transformers' sdpa on the same engine (ours: show that it pays)
    model: Any = engine.runner.model
    ours = getattr(model.config, "_attn_implementation", None)
    if ours in IMPLEMENTATIONS:
        def with_sdpa(run_once: Callable[[], tuple[float, float]]) -> Callable[[], tuple[float, float]]:
            def go() -> tuple[float, float]:
                model.set_attn_implementation("sdpa")
                try:
                    return run_once()
                finally:
                    model.set_attn_implementation(ours)
            return go
        systems["engine_base_sdpa"] = in_mode("swap", with_sdpa(base_run))

    # the other decoder: on CUDA the default replays a captured graph, so time the dynamic cache beside it;
    # on CPUs the default is the dynamic cache, so time the static one (the step a GPU would capture)
    alt = "dynamic" if engine.decoder == "graph" else "static"
    engine_alt = Engine(registry, "bench", mode="swap", pool_bytes=8 << 30, device=p.device, dtype=dtype,
                        decoder=alt)
    systems[f"engine_base_{alt}"] = engine_gen([None] * p.rows, engine_alt)
    systems[f"engine_adapters_{alt}"] = engine_gen(mixed, engine_alt)
    results["decoder"] = {"default": engine.decoder, "other": alt}

    # merge switch time: unmerge + merge of an adapter already in the host cache
    engine.set_mode("merge")
    engine.merge(names[0])
    results["merge_switch_ms"] = 1e3 * statistics.median(engine.merge(names[i]) for i in range(1, 6))
    engine.set_mode("swap")

    # cold load (registry → pool → first token) vs warm, one row
    cold: dict[str, Any] = {}
    for rank in p.cold_ranks:
        ref = f"cold{rank}"
        request = [Request(prompt=prompts[0], adapter=ref, sampling=SamplingParams(max_new_tokens=1))]
        colds = []
        for _ in range(p.repeats):
            engine.unload(ref)  # off the device and out of the host cache: the next request reads the registry
            sync(p.device)
            start = time.perf_counter()
            engine.generate(request)
            sync(p.device)
            colds.append(time.perf_counter() - start)
        warm = timed(lambda request=request: engine.generate(request), p.device, p.repeats)  # type: ignore[misc]
        cold[f"r{rank}"] = {"cold_ms": 1e3 * statistics.median(colds), "warm_ms": 1e3 * warm,
                            "adapter_bytes": engine.pool.nbytes(engine.pool.resolve(ref))}
    results["cold_load"] = cold

    inputs = torch.tensor(prompts, device=p.device)
    mask = torch.ones_like(inputs)

    def hf_gen(model: Any, **extra: Any) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            streamer = FirstToken(p.device)
            sync(p.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=inputs, attention_mask=mask, max_new_tokens=p.new,
                                     min_new_tokens=p.new, do_sample=False, pad_token_id=0, streamer=streamer,
                                     **extra)
            sync(p.device)
            assert out.shape[1] == p.prompt + p.new and streamer.first is not None
            return streamer.first - start, time.perf_counter() - start
        return go

    from transformers import AutoModelForCausalLM

    hf: Any = AutoModelForCausalLM.from_pretrained(str(registry.base("bench").path), dtype=dtype)
    hf = hf.to(p.device).eval()
    systems["hf_generate_base"] = hf_gen(hf)
    if p.fp32_baseline and dtype != torch.float32:
        hf32: Any = AutoModelForCausalLM.from_pretrained(str(registry.base("bench").path), dtype=torch.float32)
        systems["hf_generate_base_fp32"] = hf_gen(hf32.to(p.device).eval())
    if not only_fast:
        from peft import PeftModel

        base: Any = AutoModelForCausalLM.from_pretrained(str(registry.base("bench").path), dtype=dtype)
        base = base.to(p.device)
        peft_model: Any = PeftModel.from_pretrained(base, str(registry.verified_path(names[0])[1]),
                                                    adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(registry.verified_path(name)[1]), adapter_name=name)
        peft_model.eval()
        peft_model.set_adapter(names[0])
        systems["peft_mixed_batch"] = hf_gen(peft_model, adapter_names=mixed)
        systems["peft_single_unmerged"] = hf_gen(peft_model)
    results["load_average_before"] = os.getloadavg()
    results.update(interleaved(systems, p))
    results["load_average_after"] = os.getloadavg()

    # the bounds: bandwidth (bytes per step) and compute (FLOPs per token), each measured here
    bandwidth = measure_bandwidth(p.device, 256 << 20 if p.device == "cpu" else 2 << 30)
    adapter_bytes = engine.pool.nbytes(engine.pool.resolve(names[0]))
    distinct = len(set(mixed))
    model = engine.runner.model
    gemm = {p.dtype: measure_gemm(p.device, dtype)}
    if "hf_generate_base_fp32" in systems:
        gemm["float32"] = measure_gemm(p.device, torch.float32)
    bounds: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for name, size, rank in [("base", element, 0), ("adapters", element, p.rank), ("base_fp32", 4, 0)]:
        flops = gemm.get(p.dtype if size == element else "float32")
        if flops is None:
            continue
        extra = distinct * adapter_bytes if rank else 0
        by_bytes = p.rows * bandwidth / step_bytes(p, model, extra, size)
        by_flops = flops / token_flops(p, model, rank)
        bounds[name] = min(by_bytes, by_flops)
        kinds[name] = "bandwidth" if by_bytes <= by_flops else "compute"
    results["bandwidth_GBps"] = bandwidth / 1e9
    results["gemm_GFLOPs"] = {k: v / 1e9 for k, v in gemm.items()}
    results["bound_tokens_per_s"] = bounds
    results["bound_kind"] = kinds
    results["ratios"] = ratios(results)
    results["config"] = asdict(p)
    results["machine"] = {"torch": torch.__version__, "platform": platform.platform(),
                          "device": torch.cuda.get_device_name() if p.device == "cuda" else
                          platform.processor() or "cpu",
                          "threads": torch.get_num_threads()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"serving-{preset_name}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"serving-{preset_name}.md").write_text(markdown(results, preset_name))
    return results


def ratios(r: dict[str, Any]) -> dict[str, float]:
    tps = {k: v["tokens_per_s"] for k, v in r.items() if isinstance(v, dict) and "tokens_per_s" in v}
    out = {
        "adapters / engine base (target >= 0.8)": tps["engine_adapters"] / tps["engine_base"],
        "merged / engine base (target >= 0.97)": tps["engine_merged"] / tps["engine_base"],
        "engine base / HF generate (target >= 2)": tps["engine_base"] / tps["hf_generate_base"],
        "engine adapters / HF generate base (target >= 2)": tps["engine_adapters"] / tps["hf_generate_base"],
    }
    if "hf_generate_base_fp32" in tps:
        out["engine base / HF generate fp32 (target >= 2)"] = tps["engine_base"] / tps["hf_generate_base_fp32"]
    out["open batch (server path), base / engine base"] = tps["open_batch_base"] / tps["engine_base"]
    out["open batch (server path), adapters / its base"] = tps["open_batch_adapters"] / tps["open_batch_base"]
    op = r["strategy"]["other"]
    out[f"{op} op / default op"] = tps[f"engine_adapters_{op}"] / tps["engine_adapters"]
    if "engine_adapters_torch_bmm" in tps:
        out["adapters: CPU kernel / torch bmm"] = tps["engine_adapters"] / tps["engine_adapters_torch_bmm"]
        out["adapters with torch bmm / engine base"] = tps["engine_adapters_torch_bmm"] / tps["engine_base"]
    if "engine_base_unpacked" in tps:
        out["base: packed weights / per-call reorder"] = tps["engine_base"] / tps["engine_base_unpacked"]
    if "engine_base_torch_attention" in tps:
        out["base: attention kernel / torch's packed call"] = tps["engine_base"] / tps["engine_base_torch_attention"]
    if "engine_base_sdpa" in tps:
        out["base: CPU decode attention / transformers sdpa"] = tps["engine_base"] / tps["engine_base_sdpa"]
    default, alt = r["decoder"]["default"], r["decoder"]["other"]
    out[f"base: {default} decoder / {alt} decoder"] = tps["engine_base"] / tps[f"engine_base_{alt}"]
    out[f"adapters: {default} decoder / {alt} decoder"] = tps["engine_adapters"] / tps[f"engine_adapters_{alt}"]
    out[f"{alt} decoder, adapters / its base"] = tps[f"engine_adapters_{alt}"] / tps[f"engine_base_{alt}"]
    if "peft_mixed_batch" in tps:
        out["adapters / PEFT mixed batch (target >= 10)"] = tps["engine_adapters"] / tps["peft_mixed_batch"]
        out["PEFT mixed / HF generate base"] = tps["peft_mixed_batch"] / tps["hf_generate_base"]
        out["PEFT single unmerged / HF generate base"] = tps["peft_single_unmerged"] / tps["hf_generate_base"]
    return out


def markdown(r: dict[str, Any], preset: str) -> str:
    c = r["config"]
    lines = [f"### Serving benchmark — preset `{preset}` ({r['machine']['device']}, torch {r['machine']['torch']}, "
             f"{r['machine']['threads']} threads)", "",
             f"Llama-shaped, random weights: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, "
             f"{c['kv_heads']} KV heads, vocab {c['vocab']}, {c['dtype']}; {c['rows']} rows, {c['prompt']}-token "
             f"prompts, {c['new']} new tokens, greedy; {c['adapters']} distinct rank-{c['rank']} adapters on q,k,v,o.",
             "", "| system | decode tokens/s (best of N) | median | bound tokens/s | % of bound | bound by | "
             "first token (prefill) ms |", "|---|---:|---:|---:|---:|---|---:|"]
    bound, kinds = r["bound_tokens_per_s"], r["bound_kind"]
    server = r["open_batch_decoder"]
    default, other = r["strategy"]["default"], r["strategy"]["other"]
    dec, alt = r["decoder"]["default"], r["decoder"]["other"]
    for key, label, b in [("engine_base", f"engine, base (no adapters; {dec} decoder, default)", "base"),
                          ("engine_adapters", f"engine, {c['adapters']} distinct adapters ({default} op, default)",
                           "adapters"),
                          (f"engine_adapters_{other}", f"engine, {c['adapters']} distinct adapters ({other} op)",
                           "adapters"),
                          ("engine_adapters_torch_bmm",
                           f"engine, {c['adapters']} distinct adapters ({default} op, torch bmm, CPU kernel off)",
                           "adapters"),
                          ("engine_base_unpacked", f"engine, base ({dec} decoder, weights not prepacked)",
                           "base"),
                          ("engine_base_torch_attention",
                           f"engine, base ({dec} decoder, torch's attention call, C kernel off)", "base"),
                          ("engine_base_sdpa", f"engine, base ({dec} decoder, transformers sdpa attention)",
                           "base"),
                          (f"engine_base_{alt}", f"engine, base ({alt} decoder)", "base"),
                          (f"engine_adapters_{alt}", f"engine, {c['adapters']} distinct adapters ({alt} decoder)",
                           "adapters"),
                          ("engine_merged", "engine, merged adapter", "base"),
                          ("open_batch_base", f"server path: open batch, base ({server} slab)", "base"),
                          ("open_batch_adapters", f"server path: open batch, {c['adapters']} adapters ({server} slab)",
                           "adapters"),
                          ("hf_generate_base", f"HF generate, base ({c['dtype']})", "base"),
                          ("hf_generate_base_fp32", "HF generate, base (float32)", "base_fp32"),
                          ("peft_mixed_batch", "PEFT mixed batch (adapter_names=)", "adapters"),
                          ("peft_single_unmerged", "PEFT single adapter, unmerged", "base")]:
        if key in r:
            tps = r[key]["tokens_per_s"]
            lines.append(f"| {label} | {tps:,.0f} | {r[key]['median_tokens_per_s']:,.0f} | {bound[b]:,.0f} | "
                         f"{100 * tps / bound[b]:.1f} % | {kinds[b]} | {1e3 * r[key]['first_token_s']:,.0f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f}× |" for k, v in r["ratios"].items()]
    lines += ["", "| cold load → first token (1 row) | cold ms | warm ms | adapter bytes |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['cold_ms']:.1f} | {v['warm_ms']:.1f} | {v['adapter_bytes']:,} |"
              for k, v in r["cold_load"].items()]
    lines += ["", f"Load average (1/5/15 min) before the timed rounds: {r['load_average_before']}, after: "
              f"{r['load_average_after']}; {c['repeats']} interleaved rounds; ratios use the best of them (other "
              "processes only ever add time).",
              "", f"CPU decode kernel for per-row LoRA: {r.get('cpu_lora_kernel')}; "
              f"for a decode step's attention: {r.get('attention_kernel')}.",
              "", f"Merge switch (unmerge + merge, adapter in host cache): {r['merge_switch_ms']:.1f} ms. "
              f"Measured in this run: copy bandwidth {r['bandwidth_GBps']:.1f} GB/s, square-GEMM "
              + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in r["gemm_GFLOPs"].items())
              + ". A row's bound is the smaller of rows × bandwidth / bytes read per decode step (the weights it "
              "multiplies, LM head included + mean KV cache + distinct adapters) and GEMM FLOP/s / FLOPs per token.",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                        help="smollm2 (default: SmolLM2-135M shape on the CPU), cpu (small, fast), gpu (~1B, CUDA)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip-peft", action="store_true", help="Skip the (slow) PEFT baselines.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds (default: the preset's).")
    parser.add_argument("--new", type=int, default=None, help="New tokens per row (default: the preset's).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 for the cpu preset: steadier on a shared machine).")
    args = parser.parse_args()
    threads = args.threads or (1 if PRESETS[args.preset].device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    preset = PRESETS[args.preset]
    if args.repeats:
        preset.repeats = args.repeats
    if args.new:
        preset.new = args.new
    results = run(args.preset, args.out, args.skip_peft)
    print(markdown(results, args.preset))


if __name__ == "__main__":
    main()
