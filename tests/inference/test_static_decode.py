"""Static decoding: the fixed-shape step on a preallocated cache gives the dynamic decoder's answers for a
mixed batch, replaying a captured step reads only its buffers, captures are redone exactly when the model's
layout changes, and the step has no host synchronisation (it traces as one graph)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.inference.generation import Sampler
from adapterhub_local.inference.static_decode import (
    StaticDecoder,
    bucket_length,
    bucket_rows,
    resolve_decoder,
    static_support,
)
from adapterhub_local.registry import Registry
from tests.inference.conftest import LORA_SPECS

MIXED = [*LORA_SPECS, "soft", None]
PROMPTS = ["hello", "a longer prompt than the rest", "x", "what is it", "tell me", "zz top", "mixed batch",
           "soft row", "plain"]


class TracedGraphs:
    """A graph backend for CPUs with CUDA graphs' semantics: capture traces the step once into an FX graph
    (``make_fx``), baking every Python decision and holding the very tensors the step read; replay runs that
    graph, never the Python, and writes into the one output buffer. A decoder that forgets to set an input in
    place, or replays a capture made for other operands, gives wrong tokens here as it would on a GPU."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        from torch.fx.experimental.proxy_tensor import make_fx

        self.captures += 1
        step()  # warm-up, as before a CUDA capture
        graph = make_fx(step)()
        output = graph()

        def replay() -> None:
            output.copy_(graph())

        return replay, output


def requests(max_new: int = 10, **sampling: Any) -> list[Request]:
    return [Request(prompt=p, adapter=r, sampling=SamplingParams(max_new_tokens=max_new, stop_at_eos=False, **sampling))
            for p, r in zip(PROMPTS, MIXED, strict=True)]


def record_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every step's logits that reach the sampler (cloned, rows of the batch only)."""
    seen: list[torch.Tensor] = []
    original = Sampler.step

    def spy(self: Sampler, logits: torch.Tensor) -> Any:
        seen.append(logits.float().clone())
        return original(self, logits)

    monkeypatch.setattr(Sampler, "step", spy)
    return seen


@pytest.mark.parametrize("strategy", ["gather", "dense"])
def test_static_decoder_equals_dynamic_on_a_mixed_batch(zoo: Registry, monkeypatch: pytest.MonkeyPatch,
                                                        strategy: str) -> None:
    seen = record_logits(monkeypatch)
    dynamic = Engine(zoo, "tiny", decoder="dynamic").generate(requests())
    dynamic_logits = list(seen)
    seen.clear()
    static = Engine(zoo, "tiny", decoder="static", lora_strategy=strategy).generate(requests())
    assert [r.token_ids for r in static] == [r.token_ids for r in dynamic]
    assert [r.text for r in static] == [r.text for r in dynamic]
    assert len(seen) == len(dynamic_logits) == 10
    for got, want in zip(seen, dynamic_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_static_rows_equal_each_row_alone(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", decoder="static")
    batch = engine.generate(requests(max_new=8))
    for request, together in zip(requests(max_new=8), batch, strict=True):
        alone = engine.generate([request])[0]
        assert alone.token_ids == together.token_ids


def test_replayed_step_equals_eager_step_and_captures_only_when_its_operands_change(zoo: Registry) -> None:
    eager = Engine(zoo, "tiny", decoder="static")
    replayed = Engine(zoo, "tiny", decoder="static")
    recorder = TracedGraphs()
    replayed.static_decoder = StaticDecoder(replayed.runner.model, replayed.runner.context, recorder)
    assert replayed.decoder == "graph"

    first = requests(max_new=9)[:4]
    assert [r.token_ids for r in replayed.generate(first)] == [r.token_ids for r in eager.generate(first)]
    assert recorder.captures == 1
    again = [Request(prompt="other words", adapter=r.adapter, sampling=r.sampling) for r in first]
    assert [r.token_ids for r in replayed.generate(again)] == [r.token_ids for r in eager.generate(again)]
    assert recorder.captures == 1, "same bucket, same layout: the captured step is replayed as is"

    # r16-mlp brings LoRA to modules no adapter touched before: the captured step lacks them
    wider = [*first[:3], Request(prompt="mlp row", adapter="r16-mlp", sampling=first[0].sampling)]
    assert [r.token_ids for r in replayed.generate(wider)] == [r.token_ids for r in eager.generate(wider)]
    assert recorder.captures == 2

    plain = [Request(prompt=p, sampling=first[0].sampling) for p in ("no", "adapters", "at", "all")]
    assert [r.token_ids for r in replayed.generate(plain)] == [r.token_ids for r in eager.generate(plain)]
    assert recorder.captures == 3, "a batch without LoRA rows runs a step captured without the LoRA path"

    # a bigger adapter reallocates the q/k/v/o stacks: a step captured before reads freed memory
    assert [r.token_ids for r in replayed.generate(first)] == [r.token_ids for r in eager.generate(first)]
    captures = recorder.captures
    replayed.load("r64-ko")
    assert [r.token_ids for r in replayed.generate(first)] == [r.token_ids for r in eager.generate(first)]
    assert recorder.captures == captures + 1


def test_static_decoder_handles_sampling_stops_and_per_row_limits(zoo: Registry) -> None:
    def batch() -> list[Request]:
        return [Request(prompt="sample me", adapter="r8-attn",
                        sampling=SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=3)),
                Request(prompt="penalised", adapter="soft",
                        sampling=SamplingParams(max_new_tokens=5, repetition_penalty=1.3)),
                Request(prompt="a long prompt with a short limit", sampling=SamplingParams(max_new_tokens=2))]

    dynamic = Engine(zoo, "tiny", decoder="dynamic").generate(batch())
    static = Engine(zoo, "tiny", decoder="static").generate(batch())
    assert [(r.token_ids, r.finish_reason) for r in static] == [(r.token_ids, r.finish_reason) for r in dynamic]
    assert [r.completion_tokens for r in static][2] <= 2


def test_merged_mode_decodes_statically(zoo: Registry) -> None:
    request = [Request(prompt="merged", adapter="r32-all", sampling=SamplingParams(max_new_tokens=8))]
    dynamic = Engine(zoo, "tiny", mode="merge", decoder="dynamic").generate(request)
    static = Engine(zoo, "tiny", mode="merge", decoder="static").generate(request)
    assert static[0].token_ids == dynamic[0].token_ids


def test_a_closed_stream_leaves_the_context_in_dynamic_mode(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", decoder="static")
    stream = engine.generate_stream(requests(max_new=6))
    next(stream)
    stream.close()
    assert engine.runner.context.staged is None and engine.runner.context.slots is None


def test_a_stale_capture_gives_wrong_tokens(zoo: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: replaying a capture made for another batch's operands (what skipping a
    recapture would do) changes the answers."""
    engine = Engine(zoo, "tiny", decoder="static")
    engine.static_decoder = StaticDecoder(engine.runner.model, engine.runner.context, TracedGraphs())
    first = requests(max_new=9)[:4]
    engine.generate(first)
    other = [Request(prompt=r.prompt, adapter=a, sampling=r.sampling)
             for r, a in zip(first, ["r32-all", "r64-ko", "r16-mlp", "r8-attn"], strict=True)]
    expected = [r.token_ids for r in Engine(zoo, "tiny", decoder="static").generate(other)]
    original = StaticDecoder._capture

    def stale(self: StaticDecoder, slab: Any, plan: Any) -> Any:
        if slab.replay is not None and slab.logits is not None:
            return slab.replay, slab.logits
        return original(self, slab, plan)

    monkeypatch.setattr(StaticDecoder, "_capture", stale)
    assert [r.token_ids for r in engine.generate(other)] != expected


@pytest.mark.parametrize("strategy", ["dense", "gather"])
def test_the_static_step_traces_as_one_graph(zoo: Registry, strategy: str) -> None:
    """No host synchronisation or data-dependent Python in the step, LoRA rows included: dynamo traces it
    whole (``fullgraph=True`` raises on any graph break), which is what CUDA-graph capture needs."""
    engine = Engine(zoo, "tiny", decoder="static", lora_strategy=strategy)
    decoder = engine.static_decoder
    slots = [engine.pool.acquire([r])[r] for r in LORA_SPECS]
    with torch.inference_mode():
        slab = decoder._slab(len(slots), 32)
        decoder._stage(slab, slots)
        engine.runner.context.staged = slab.ident
        try:
            slab.mask.fill_(True)
            eager = decoder._step(slab).clone()
            slab.cache.reset()
            torch._dynamo.reset()
            traced = torch.compile(lambda: decoder._step(slab), fullgraph=True, backend="eager")()
        finally:
            engine.runner.context.staged = None
    torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("strategy", ["dense", "gather"])
def test_staging_uses_the_batch_rank_not_the_largest_resident(zoo: Registry, strategy: str) -> None:
    """A resident rank-64 adapter on k/o does not make a batch of rank-8 rows compute at rank 64 there."""
    engine = Engine(zoo, "tiny", decoder="static", lora_strategy=strategy)
    engine.load("r64-ko")
    slot = engine.pool.acquire([engine.pool.resolve("r8-attn")])[engine.pool.resolve("r8-attn")]
    k_proj = engine.runner.model.get_submodule("model.layers.0.self_attn.k_proj")
    assert k_proj.rank == 64
    rows, places, rank, groups = k_proj.stage(99, [slot, 0, slot])
    assert (rows, rank) == (3, 8) and places == (1 if strategy == "dense" else 0)
    # gather: one rank-8 group of the two adapted rows (the base row is not computed), operands kept
    assert groups == (() if strategy == "dense" else ((2, 8, False, True),))
    assert k_proj.stage(99, [0, 0]) == (), "no LoRA row on the module: the step skips it"
    k_proj.unstage(99)
    batch = [Request(prompt="low rank", adapter="r8-attn", sampling=SamplingParams(max_new_tokens=6)),
             Request(prompt="high rank", adapter="r64-ko", sampling=SamplingParams(max_new_tokens=6))]
    dynamic = Engine(zoo, "tiny", decoder="dynamic", lora_strategy=strategy).generate(batch)
    assert [r.token_ids for r in engine.generate(batch)] == [r.token_ids for r in dynamic]


def test_buckets() -> None:
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]
    assert [bucket_length(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]


def test_decoder_choice_errors_name_the_fix(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    model = engine.runner.model
    assert engine.decoder == "dynamic", "auto on a CPU"
    with pytest.raises(UnsupportedError, match=r"CUDA graphs need a CUDA device.*decoder='static'"):
        resolve_decoder("graph", torch.device("cpu"), model)
    with pytest.raises(UnsupportedError, match="unknown decoder"):
        resolve_decoder("fast", torch.device("cpu"), model)
    original = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert "4-D mask" in (static_support(model) or "")
        with pytest.raises(UnsupportedError, match=r"cannot run this base.*decoder='dynamic'"):
            resolve_decoder("static", torch.device("cpu"), model)
        assert resolve_decoder("auto", torch.device("cuda"), model) == "dynamic"
    finally:
        model.config._attn_implementation = original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoding_equals_the_eager_static_step(zoo: Registry) -> None:
    eager = Engine(zoo, "tiny", device="cuda", decoder="static")
    graph = Engine(zoo, "tiny", device="cuda")
    assert graph.decoder == "graph"
    for _ in range(2):
        assert [r.token_ids for r in graph.generate(requests())] == [r.token_ids for r in eager.generate(requests())]
    assert graph.static_decoder.captures == 1
    dynamic = Engine(zoo, "tiny", device="cuda", decoder="dynamic").generate(requests())
    assert [r.token_ids for r in graph.generate(requests())] == [r.token_ids for r in dynamic]
