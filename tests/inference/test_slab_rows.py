"""Continuous batching on a static slab: rows that join and leave mid-decode (mixed adapters, a soft prompt,
base rows, greedy and seeded sampling) produce exactly their solo tokens; a leaver's slot is reused without
its keys leaking; the ring of columns wraps and the slab grows without changing anyone's tokens; nothing is
copied on join or leave; a captured step (CUDA-graph semantics, on the CPU) replays the same tokens."""

from __future__ import annotations

import pytest
import torch

from adapterhub_local.inference import Engine, GenerationResult, Request, SamplingParams, kv_rows
from adapterhub_local.inference.continuous import OpenBatch
from adapterhub_local.inference.slab_rows import SlabRows
from adapterhub_local.inference.static_decode import resolve_continuous
from adapterhub_local.registry import Registry
from tests.inference.test_continuous import drive, requests
from tests.inference.test_static_decode import TracedGraphs


def greedy(prompt: str, adapter: str | None, new: int, **extra: float | int) -> Request:
    return Request(prompt=prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=new, stop_at_eos=False,
                                                                           **extra))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(zoo: Registry) -> Engine:
    engine = Engine(zoo, "tiny", pool_bytes=64 << 20)
    assert engine.continuous_decoder == "static" and engine.decoder == "dynamic"  # solo runs: growing cache
    return engine


def solo(engine: Engine, reqs: list[Request]) -> list[GenerationResult]:
    return [engine.generate([r])[0] for r in reqs]


def slab_of(batch: OpenBatch) -> SlabRows:
    assert batch.slab is not None
    return batch.slab


def test_a_freed_slot_is_reused_without_stale_keys(engine: Engine) -> None:
    reqs = [greedy("a long prompt that fills many columns", "r32-all", 2), greedy("hi", "r8-attn", 24),
            greedy("new", None, 12), greedy("soft one", "soft", 9, temperature=0.8, seed=5, top_k=10)]
    batch = engine.open_batch(max_wait_steps=0)
    slab = slab_of(batch)
    grown = slab.grown
    results, _ = drive(batch, {0: [0, 1], 5: [2], 19: [3]}, reqs)
    assert slab.used == 0 and slab.grown == grown, "joiners took the slots that finished rows freed"
    for k, alone in enumerate(solo(engine, reqs)):
        assert results[k].token_ids == alone.token_ids, f"row {k} differs from its solo run"
    batch.close()


def test_rows_decoding_across_the_ring_end_equal_solo(engine: Engine) -> None:
    """Rows keep joining, so the batch never empties and the write column wraps past the slab's end."""
    adapters = ["r1-q", None, "soft", "r16-mlp", "r4-qv", "r64-ko"]
    reqs = [greedy(f"row {k} says", a, 30, **({"temperature": 0.9, "seed": k} if k % 2 else {}))
            for k, a in enumerate(adapters)]
    batch = engine.open_batch(max_wait_steps=0)
    slab = slab_of(batch)
    results, _ = drive(batch, {10 * k: [k] for k in range(len(reqs))}, reqs)
    assert slab.columns == 64 and batch.steps > 64, "the ring wrapped"
    for k, alone in enumerate(solo(engine, reqs)):
        assert results[k].token_ids == alone.token_ids, f"row {k} differs from its solo run"
    batch.close()


def test_the_slab_grows_for_more_rows_and_longer_rows(engine: Engine) -> None:
    reqs = [greedy("first", "r2-v", 20), greedy("second one", None, 14), greedy("three", "r8-attn", 12),
            greedy("four", "soft", 10), greedy("a row needing more columns", "r1-q", 90)]
    batch = engine.open_batch(max_wait_steps=0)
    slab = slab_of(batch)
    results, _ = drive(batch, {0: [0], 3: [1, 2], 6: [3], 8: [4]}, reqs)
    assert slab.grown >= 2 and slab.rows == 8 and slab.columns == 128
    for k, alone in enumerate(solo(engine, reqs)):
        assert results[k].token_ids == alone.token_ids, f"row {k} differs from its solo run"
    batch.close()


def test_join_and_leave_copy_no_cache(engine: Engine) -> None:
    reqs = requests()
    batch = engine.open_batch(max_rows=16, max_wait_steps=0)
    slab = slab_of(batch)
    batch.join(reqs[:8], list(range(8)))
    batch.step()
    pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in kv_rows.static_layers(slab.cache)]
    grown = slab.grown
    drive(batch, {0: [8], 2: [9]}, reqs, cancel={3: 1, 5: 2})
    assert slab.grown == grown
    assert [(layer.keys.data_ptr(), layer.values.data_ptr())
            for layer in kv_rows.static_layers(slab.cache)] == pointers
    batch.close()


def test_the_engine_keeps_one_slab_across_batches(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    first = engine.open_batch()
    held = slab_of(first)
    other = engine.open_batch()
    assert slab_of(other) is not held, "a slab serves one open batch at a time"
    first.close()
    other.close()
    assert slab_of(engine.open_batch()) is held


@pytest.mark.parametrize("seed", [0, 1])
def test_a_captured_step_replays_the_solo_tokens(zoo: Registry, seed: int) -> None:
    """CUDA-graph semantics on the CPU (:class:`TracedGraphs`): the step is traced once and replayed; a capture
    mid-batch (new adapter shapes) undoes its warm-up writes; every row still equals its solo run."""
    engine = Engine(zoo, "tiny", pool_bytes=64 << 20)
    recorder = TracedGraphs()
    slab = SlabRows(engine.runner.model, engine.runner.context, recorder, engine.context_length)
    reqs = requests(seed)
    alone = solo(engine, reqs)
    schedule = {0: [0, 8], 2: [1, 2], 4: [3], 5: [4, 5, 6], 7: [7, 9]} if seed else {0: list(range(len(reqs)))}
    results, streamed = drive(OpenBatch(engine, max_wait_steps=0, slab=slab), schedule, reqs)
    for k, result in results.items():
        assert result.token_ids == alone[k].token_ids, f"row {k} ({reqs[k].adapter}) differs from its solo run"
        assert result.text == alone[k].text == streamed[k]
    assert 1 <= slab.captures == recorder.captures <= len(schedule)
    assert engine.open_rows == 0 and not engine.pool.busy


def test_bases_without_static_support_batch_on_the_growing_cache(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    config = engine.runner.model.config
    config.sliding_window = 8
    try:
        assert resolve_continuous("auto", torch.device("cpu"), engine.runner.model) == "dynamic"
        assert resolve_continuous("dynamic", torch.device("cpu"), engine.runner.model) == "dynamic"
    finally:
        config.sliding_window = None
    assert resolve_continuous("auto", torch.device("cpu"), engine.runner.model) == "static"
    assert Engine(zoo, "tiny", decoder="dynamic").open_batch().slab is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_default_open_batch_replays_a_graph_with_solo_tokens(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", device="cuda", pool_bytes=64 << 20)
    assert engine.continuous_decoder == "graph"
    reqs = requests(1)
    alone = [Engine(zoo, "tiny", device="cuda", decoder="dynamic").generate([r])[0] for r in reqs]
    for schedule in ({0: list(range(len(reqs)))}, {0: [0, 8], 2: [1, 2], 4: [3], 5: [4, 5, 6], 7: [7, 9]}):
        batch = engine.open_batch(max_wait_steps=0)
        results, _ = drive(batch, schedule, reqs)
        slab = slab_of(batch)
        batch.close()
        assert [results[k].token_ids for k in range(len(reqs))] == [a.token_ids for a in alone]
    assert slab.captures >= 1 and slab.graphs is not None
