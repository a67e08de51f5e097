"""Continuous batching: rows joining and leaving an open decode batch get exactly the output they get alone,
on the static slab (the default) and on the growing cache."""

from __future__ import annotations

import random

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import Engine, GenerationResult, Request, SamplingParams, kv_rows
from adapterhub_local.inference.continuous import OpenBatch
from adapterhub_local.inference.kv_rows import right_aligned_mask
from adapterhub_local.registry import Registry
from tests.inference.test_gpt2 import gpt2_registry  # noqa: F401  (fixture)

PROMPTS = ["The cat", "hello world, again", "x", "Numbers 12345", "abc def", "Q: why?", "ok", "Zebra zone!",
           "longer prompt for padding", "mid"]
ADAPTERS: list[str | None] = ["r1-q", "r2-v", "r4-qv", "r8-attn", "r16-mlp", "r32-all", "r64-ko", "soft", None,
                              "r8-attn"]


def requests(seed: int = 0) -> list[Request]:
    """Rows with different adapters (a soft prompt, no adapter), lengths, max tokens and sampling."""
    rng = random.Random(seed)
    out = []
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, ADAPTERS, strict=True)):
        sampled = i % 3 == 1
        out.append(Request(prompt=prompt, adapter=adapter, sampling=SamplingParams(
            max_new_tokens=rng.randint(1, 14), stop_at_eos=False, temperature=0.9 if sampled else 0.0,
            top_k=20 if sampled else 0, seed=100 + i if sampled else None,
            repetition_penalty=1.3 if i % 4 == 3 else 1.0)))
    return out


@pytest.fixture(scope="module", params=["auto", "dynamic"])
def engine(zoo: Registry, request: pytest.FixtureRequest) -> Engine:
    """``auto``: open batches decode on a static slab (solo runs on the growing cache); ``dynamic``: both on
    transformers' growing cache, rows edited by :mod:`kv_rows`."""
    engine = Engine(zoo, "tiny", pool_bytes=64 << 20, decoder=request.param)
    assert engine.continuous_decoder == ("static" if request.param == "auto" else "dynamic")
    return engine


@pytest.fixture(scope="module")
def solo(engine: Engine) -> list[GenerationResult]:
    return [engine.generate([r])[0] for r in requests()]


def drive(batch: OpenBatch, schedule: dict[int, list[int]], reqs: list[Request],
          cancel: dict[int, int] | None = None) -> tuple[dict[int, GenerationResult], dict[int, str]]:
    """Join request ``k`` at step ``s`` for ``k in schedule[s]``; leave ``key`` at step ``cancel[key]``;
    step until every row is done. Returns results and the streamed text per key."""
    results: dict[int, GenerationResult] = {}
    streamed: dict[int, str] = {k: "" for k in range(len(reqs))}
    cancel = cancel or {}
    step = 0
    while step <= max(schedule) or batch:
        batch.join([reqs[k] for k in schedule.get(step, [])], schedule.get(step, []))
        events = batch.step()
        for event in events:
            streamed[event.index] = streamed.get(event.index, "") + event.text
            if event.finished:
                assert event.result is not None and event.index not in results
                results[event.index] = event.result
                assert event.index not in batch.keys, "a finished row leaves at once"
        for key, at in cancel.items():
            if at == step:
                batch.leave(key)
        step += 1
        assert step < 200
    return results, streamed


@pytest.mark.parametrize(("seed", "fuse_budget", "max_wait_steps"),
                         [(0, 4096, 0), (1, 4096, 3), (2, 4096, 1), (0, 0, 0), (3, 0, 3), (4, 32, 3)])
def test_rows_joining_and_leaving_equal_solo_runs(engine: Engine, solo: list[GenerationResult], seed: int,
                                                  fuse_budget: int, max_wait_steps: int) -> None:
    """Joiners are prefilled in one forward with the live rows' decode (large budget) or on their own (0), at
    once or after waiting a few steps."""
    reqs = requests()
    rng = random.Random(seed)
    schedule: dict[int, list[int]] = {}
    for k in range(len(reqs)):
        schedule.setdefault(rng.randint(0, 8), []).append(k)
    batch = OpenBatch(engine, fuse_budget=fuse_budget, max_wait_steps=max_wait_steps)
    results, streamed = drive(batch, schedule, reqs)
    assert sorted(results) == list(range(len(reqs)))
    for k, result in results.items():
        assert result.token_ids == solo[k].token_ids, f"row {k} ({reqs[k].adapter}) differs from its solo run"
        assert result.text == solo[k].text == streamed[k]
        assert result.finish_reason == solo[k].finish_reason and result.adapter == solo[k].adapter
    assert engine.open_rows == 0 and not engine.pool.busy


def test_all_rows_at_once_then_one_by_one_equal_solo(engine: Engine, solo: list[GenerationResult]) -> None:
    reqs = requests()
    together, _ = drive(engine.open_batch(), {0: list(range(len(reqs)))}, reqs)
    staggered, _ = drive(engine.open_batch(), {s: [s] for s in range(len(reqs))}, reqs)
    for k in range(len(reqs)):
        assert together[k].token_ids == staggered[k].token_ids == solo[k].token_ids


def test_cancelled_rows_leave_without_disturbing_the_rest(engine: Engine, solo: list[GenerationResult]) -> None:
    reqs = [Request(prompt=r.prompt, adapter=r.adapter, sampling=SamplingParams(
        max_new_tokens=12, stop_at_eos=False, temperature=r.sampling.temperature, top_k=r.sampling.top_k,
        seed=r.sampling.seed)) for r in requests()]
    alone = [engine.generate([r])[0] for r in reqs]
    batch = engine.open_batch()
    results, _ = drive(batch, {0: [0, 1, 2, 3, 4], 2: [5, 6, 7, 8, 9]}, reqs, cancel={1: 1, 7: 4, 8: 2})
    assert set(results) == set(range(len(reqs))) - {1, 7, 8}
    for k, result in results.items():
        assert result.token_ids == alone[k].token_ids
    assert engine.open_rows == 0 and not engine.pool.busy


def test_a_short_row_finishes_while_a_long_one_decodes(engine: Engine) -> None:
    batch = engine.open_batch()
    long = Request(prompt="long one", sampling=SamplingParams(max_new_tokens=40, stop_at_eos=False))
    short = Request(prompt="short", adapter="r4-qv", sampling=SamplingParams(max_new_tokens=3, stop_at_eos=False))
    batch.join([long], [0])
    finished_at = None
    for step in range(40):
        if step == 5:
            batch.join([short], [1])
        if any(e.finished and e.index == 1 for e in batch.step()):
            finished_at = step
            break
    # it waits at most max_wait_steps, is prefilled (its first token) and takes two more steps
    assert finished_at is not None and finished_at <= 5 + batch.max_wait_steps + 2
    assert batch.keys == [0], "the long row keeps decoding"
    batch.close()
    assert engine.open_rows == 0


def test_stop_strings_and_eos_end_rows_as_alone(engine: Engine) -> None:
    free = engine.generate([Request(prompt="stop test", sampling=SamplingParams(max_new_tokens=20))])[0]
    stop = free.text[2:4]
    reqs = [Request(prompt="stop test", sampling=SamplingParams(max_new_tokens=20, stop=[stop])),
            Request(prompt="other row", adapter="r2-v", sampling=SamplingParams(max_new_tokens=20)),
            Request(prompt="one token", sampling=SamplingParams(max_new_tokens=1))]
    alone = [engine.generate([r])[0] for r in reqs]
    results, _ = drive(engine.open_batch(), {0: [1], 1: [0, 2]}, reqs)
    for k, result in results.items():
        assert (result.text, result.finish_reason) == (alone[k].text, alone[k].finish_reason)
    assert results[0].finish_reason == "stop" and stop not in results[0].text


def test_busy_adapters_are_not_evicted_unloaded_or_merged(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", pool_bytes=1 << 24)
    batch = engine.open_batch()
    batch.join([Request(prompt="busy", adapter="r8-attn", sampling=SamplingParams(max_new_tokens=30))], [0])
    ref = engine.pool.resolve("r8-attn")
    assert engine.pool.busy[ref] == 1
    with pytest.raises(UnsupportedError, match="in use"):
        engine.unload("r8-attn")
    with pytest.raises(UnsupportedError, match="open batch"):
        engine.merge("r4-qv")
    assert engine.mode == "swap" and engine.merged is None
    # other engine work between steps (another adapter's batch) leaves the live row intact
    engine.generate([Request(prompt="between", adapter="r32-all", sampling=SamplingParams(max_new_tokens=2))])
    assert ref in engine.pool.device
    results, _ = drive(batch, {0: []}, [])
    alone = engine.generate([Request(prompt="busy", adapter="r8-attn", sampling=SamplingParams(max_new_tokens=30))])
    assert results[0].token_ids == alone[0].token_ids
    assert not engine.pool.busy
    engine.unload("r8-attn")


def test_fits_respects_rows_and_the_pool(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    batch = engine.open_batch(max_rows=2)
    one = Request(prompt="a", sampling=SamplingParams(max_new_tokens=5))
    assert batch.fits([one, one]) and not batch.fits([one, one, one])
    batch.join([one], [0])
    assert batch.fits([one]) and not batch.fits([one, one])
    with pytest.raises(UnsupportedError, match="at most 2"):
        batch.join([one, one], [1, 2])
    with pytest.raises(UnsupportedError, match="unique"):
        batch.join([one], [0])
    batch.close()
    assert not batch and engine.open_rows == 0


def test_merge_mode_refuses_an_open_batch(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", mode="merge")
    assert not engine.can_open_batch
    with pytest.raises(UnsupportedError, match="needs swap or auto mode"):
        engine.open_batch().join([Request(prompt="a")], [0])
    engine.set_mode("swap")
    assert engine.can_open_batch
    assert not Engine(zoo, "enc").can_open_batch  # an encoder cannot generate


def test_auto_mode_batches_continuously_until_its_policy_merges(zoo: Registry) -> None:
    from adapterhub_local.inference.policy import AutoPolicy

    engine = Engine(zoo, "tiny", mode="auto", policy=AutoPolicy(window=8, min_requests=4, threshold=0.75))
    assert engine.can_open_batch, "auto mode swaps until the traffic says otherwise"
    batch = engine.open_batch()
    mixed = [Request(prompt="a", adapter=r, sampling=SamplingParams(max_new_tokens=2)) for r in ("r8-attn", "r2-v")]
    batch.join(mixed, [0, 1])
    assert engine.can_open_batch
    hot = [Request(prompt=f"hot {i}", adapter="r8-attn", sampling=SamplingParams(max_new_tokens=2)) for i in range(6)]
    batch.join(hot, list(range(2, 8)))
    assert engine.policy.decision == engine.pool.resolve("r8-attn")
    assert not engine.can_open_batch, "the policy wants to merge: the scheduler lets this batch drain"
    while batch:
        batch.step()
    batch.close()
    assert engine.generate(hot[:2])[0].adapter == engine.pool.resolve("r8-attn")
    assert engine.merged == engine.pool.resolve("r8-attn") and not engine.can_open_batch


def test_caches_that_cannot_be_edited_are_refused() -> None:
    class Layer:
        is_sliding = True
        keys = values = torch.zeros(1, 1, 3, 2)

    class Cache:
        def __init__(self) -> None:
            self.layers = [Layer()]

    with pytest.raises(UnsupportedError, match="sliding"):
        kv_rows.width(Cache())
    with pytest.raises(UnsupportedError, match="cannot edit"):
        kv_rows.width(object())


def test_right_aligned_mask() -> None:
    mask = right_aligned_mask([3, 1, 4], 4, torch.device("cpu"))
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("decoder", ["auto", "dynamic"])
def test_gpt2_rows_joining_and_leaving_equal_solo_runs(gpt2_registry: Registry, decoder: str) -> None:  # noqa: F811
    """Absolute position embeddings (GPT-2): positions must count each row's real tokens only."""
    engine = Engine(gpt2_registry, "g", decoder=decoder)
    reqs = [Request(prompt=p, adapter=a, sampling=SamplingParams(max_new_tokens=n, stop_at_eos=False))
            for p, a, n in [("gpt two", "attn", 9), ("a much longer prompt here", "mlp", 4), ("x", None, 12),
                            ("mid size", "attn", 6)]]
    alone = [engine.generate([r])[0] for r in reqs]
    results, _ = drive(engine.open_batch(), {0: [0], 2: [1, 2], 5: [3]}, reqs)
    for k, result in results.items():
        assert result.token_ids == alone[k].token_ids


@pytest.mark.parametrize("decoder", ["auto", "dynamic"])
def test_a_row_ending_at_the_context_limit_leaves_before_overrunning_it(gpt2_registry: Registry,  # noqa: F811
                                                                       decoder: str) -> None:
    engine = Engine(gpt2_registry, "g", decoder=decoder)  # 64 positions
    full = Request(prompt="y" * 55, sampling=SamplingParams(max_new_tokens=40, stop_at_eos=False))
    others = [Request(prompt=p, sampling=SamplingParams(max_new_tokens=30, stop_at_eos=False)) for p in "zwv"]
    alone = [engine.generate([r])[0] for r in (full, *others)]
    assert alone[0].finish_reason == "length" and alone[0].completion_tokens < 40  # cut by the context
    results, _ = drive(engine.open_batch(), {0: [0, 1, 2, 3]}, [full, *others])
    assert [results[k].token_ids for k in range(4)] == [a.token_ids for a in alone]
