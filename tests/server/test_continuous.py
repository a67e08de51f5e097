"""Continuous batching in the scheduler: a request that arrives while others decode joins at the next step,
finished rows return at once (a short request is not held back by a long one), streams get every token,
and every row still gets its solo answer whatever joins or leaves around it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import pytest

from adapterhub_local.errors import AdapterHubError
from adapterhub_local.inference.continuous import OpenBatch
from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request, SamplingParams
from adapterhub_local.registry import Registry
from adapterhub_local.server.backend import ServingEngine
from adapterhub_local.server.metrics import ServerMetrics
from adapterhub_local.server.scheduler import Scheduler, SchedulerConfig

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=120))


class Recording:
    """The real engine, keeping the open batches the scheduler makes (to read their step counts)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches: list[OpenBatch] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def open_batch(self, max_rows: int = 64) -> OpenBatch:
        self.batches.append(self.engine.open_batch(max_rows))
        return self.batches[-1]


@pytest.fixture(scope="module")
def engine(served_registry: Registry) -> Engine:
    return Engine(served_registry, "tiny", mode="swap")


def request(adapter: str | None, prompt: str = "hello", tokens: int = 6, **sampling: object) -> Request:
    return Request(prompt=prompt, adapter=adapter, sampling=SamplingParams(
        max_new_tokens=tokens, stop_at_eos=False, **sampling))  # type: ignore[arg-type]


def test_a_short_request_is_not_held_back_by_a_long_one(engine: Engine) -> None:
    long = request("lora1", prompt="a long story", tokens=150)
    short = request("lora2", prompt="quick", tokens=3)
    solo_short = engine.generate([short])[0]
    recording = Recording(engine)

    async def go() -> None:
        scheduler = Scheduler(cast(ServingEngine, recording), SchedulerConfig(window_ms=0))
        long_job = scheduler.submit(long, "lora1", streaming=True)
        events = scheduler.stream(long_job)
        await events.__anext__()  # the long request is decoding
        result = await scheduler.result(scheduler.submit(short, "lora2"))
        assert result.token_ids == solo_short.token_ids
        assert not long_job.finished, "the short request came back while the long one still decodes"
        assert len(recording.batches) == 1, "the short request joined the running batch"
        steps_at_short = recording.batches[0].steps
        rest = [e async for e in events]
        assert rest[-1].finished and rest[-1].result is not None
        assert rest[-1].result.completion_tokens == 150
        assert steps_at_short < 150 - 3
        await scheduler.stop()

    run(go)


def test_rows_arriving_at_different_steps_get_their_solo_answers(engine: Engine) -> None:
    adapters: list[str | None] = [None, "soft", *(f"lora{i}" for i in range(6))]
    requests = [request(a, prompt=f"row {i} " + "x" * (i % 4), tokens=3 + (5 * i) % 17,
                        **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {}))
                for i, a in enumerate(adapters)]
    solo = [engine.generate([r])[0] for r in requests]
    metrics = ServerMetrics()

    async def go() -> list[list[int]]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0), metrics)
        jobs = []
        for r in requests:
            jobs.append(scheduler.submit(r, str(r.adapter)))
            await asyncio.sleep(0.01)  # arrivals spread over the decode of the earlier rows
        results = await asyncio.gather(*(scheduler.result(j) for j in jobs))
        await scheduler.stop()
        return [r.token_ids for r in results]

    assert run(go) == [s.token_ids for s in solo]
    assert "adapterhub_batch_size_count" in metrics.render()
    assert engine.open_rows == 0 and not engine.pool.busy


def test_streams_get_one_token_per_event_and_add_up(engine: Engine) -> None:
    requests = [request("lora3", prompt="stream a", tokens=9), request("soft", prompt="stream b", tokens=5)]
    solo = [engine.generate([r])[0] for r in requests]

    async def go() -> None:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0))
        for r, expected in zip(requests, solo, strict=True):
            events = [e async for e in scheduler.stream(scheduler.submit(r, "m", streaming=True))]
            assert all(len(e.token_ids) <= 1 for e in events)
            assert [t for e in events for t in e.token_ids] == expected.token_ids
            assert "".join(e.text for e in events) == expected.text
        await scheduler.stop()

    run(go)


def test_a_bad_joiner_fails_alone_and_live_rows_carry_on(engine: Engine) -> None:
    long = request("lora1", prompt="carry on", tokens=40)
    good = request("lora4", prompt="good", tokens=4)
    solo = [engine.generate([r])[0].token_ids for r in (long, good)]

    async def go() -> None:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0))
        long_job = scheduler.submit(long, "lora1", streaming=True)
        events = scheduler.stream(long_job)
        await events.__anext__()
        unknown = scheduler.submit(request("no-such-adapter"), "x")
        too_long = scheduler.submit(request("lora2", prompt="x" * (engine.context_length + 1)), "lora2")
        fine = scheduler.submit(good, "lora4")
        for bad in (unknown, too_long):
            with pytest.raises(AdapterHubError):
                await scheduler.result(bad)
        assert (await scheduler.result(fine)).token_ids == solo[1]
        rest = [e async for e in events]
        assert rest[-1].result is not None and rest[-1].result.token_ids == solo[0]
        await scheduler.stop()

    run(go)


def test_a_dropped_stream_leaves_the_batch(engine: Engine) -> None:
    recording = Recording(engine)
    long = request("lora1", prompt="go", tokens=200)

    async def go() -> None:
        scheduler = Scheduler(cast(ServingEngine, recording))
        job = scheduler.submit(long, "lora1", streaming=True)
        events = scheduler.stream(job)
        assert not (await events.__anext__()).finished
        await events.aclose()  # what a client disconnect does to the response generator
        assert await scheduler.call(lambda: engine.open_rows) == 0  # runs once the row has left
        await scheduler.stop()

    run(go)
    assert recording.batches[0].steps < 199, "the row left before its 200 tokens"


def test_admin_calls_wait_for_live_rows_and_classification_runs_between_steps(engine: Engine) -> None:
    long = request("lora1", prompt="long", tokens=120)
    alone = engine.classify([Request(prompt="a fine film", adapter="sentiment")])[0]

    async def go() -> None:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0))
        long_job = scheduler.submit(long, "lora1", streaming=True)
        events = scheduler.stream(long_job)
        await events.__anext__()
        labels = await scheduler.classify([Request(prompt="a fine film", adapter="sentiment")])
        assert labels[0].probabilities == alone.probabilities
        assert not long_job.finished, "classification ran between decode steps"
        rows = await scheduler.call(lambda: engine.open_rows)
        assert rows == 0 and long_job.finished, "an admin call runs once the live rows are done"
        async for _ in events:
            pass
        await scheduler.stop()

    run(go)


def test_merge_mode_and_the_flag_fall_back_to_dynamic_batching(served_registry: Registry) -> None:
    merged = Recording(Engine(served_registry, "tiny", mode="merge"))
    off = Recording(Engine(served_registry, "tiny", mode="swap"))

    async def go() -> None:
        for engine, config in ((merged, SchedulerConfig()), (off, SchedulerConfig(continuous=False))):
            scheduler = Scheduler(cast(ServingEngine, engine), config)
            await scheduler.result(scheduler.submit(request("lora1", tokens=2), "lora1"))
            await scheduler.stop()

    run(go)
    assert merged.batches == [] and off.batches == []


def test_auto_mode_batches_continuously_then_merges_when_one_adapter_dominates(served_registry: Registry) -> None:
    from adapterhub_local.inference.policy import AutoPolicy

    engine = Recording(Engine(served_registry, "tiny", mode="auto",
                              policy=AutoPolicy(window=8, min_requests=4, threshold=0.75)))
    long, short = request("lora1", prompt="a long story", tokens=60), request("lora2", prompt="quick", tokens=3)
    solo = Engine(served_registry, "tiny", mode="swap")
    expected_short, expected_hot = solo.generate([short])[0], solo.generate([request("lora1", tokens=4)])[0]

    async def go() -> None:
        scheduler = Scheduler(cast(ServingEngine, engine), SchedulerConfig(window_ms=0))
        long_job = scheduler.submit(long, "lora1", streaming=True)
        events = scheduler.stream(long_job)
        await events.__anext__()
        result = await scheduler.result(scheduler.submit(short, "lora2"))
        assert result.token_ids == expected_short.token_ids and not long_job.finished
        assert len(engine.batches) == 1, "auto mode, mixed traffic: the short request joined the open batch"
        [e async for e in events]
        for _ in range(8):  # traffic now goes to lora1 alone: the policy merges it
            hot = await scheduler.result(scheduler.submit(request("lora1", tokens=4), "lora1"))
            assert hot.token_ids == expected_hot.token_ids
        await scheduler.stop()

    run(go)
    assert engine.engine.merged == engine.engine.pool.resolve("lora1")
    assert engine.engine.switches >= 1
