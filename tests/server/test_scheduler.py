"""The scheduler over the real engine: batches mix adapters and give each row its solo answer; a failing
request never fails its neighbours; timeouts, cancellation, ordering and graceful shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar, cast

import pytest

from adapterhub_local.errors import AdapterHubError
from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request, SamplingParams, StreamEvent
from adapterhub_local.registry import Registry
from adapterhub_local.server.backend import ServingEngine
from adapterhub_local.server.errors import OverloadedError, RequestTimeoutError
from adapterhub_local.server.metrics import ServerMetrics
from adapterhub_local.server.scheduler import Job, Scheduler, SchedulerConfig

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=120))


@pytest.fixture(scope="module")
def engine(served_registry: Registry) -> Engine:
    return Engine(served_registry, "tiny", mode="swap")


def request(adapter: str | None, prompt: str = "hello", tokens: int = 6) -> Request:
    return Request(prompt=prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=tokens))


def test_engine_satisfies_the_protocol(engine: Engine) -> None:
    assert isinstance(engine, ServingEngine)


def test_mixed_batch_rows_equal_solo_runs(engine: Engine) -> None:
    adapters = [None, "soft", *(f"lora{i}" for i in range(6))]
    requests = [request(a, prompt=f"row {i}") for i, a in enumerate(adapters)]
    solo = [engine.generate([r])[0].text for r in requests]
    metrics = ServerMetrics()

    async def go() -> list[str]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=200), metrics)
        jobs = [scheduler.submit(r, str(r.adapter)) for r in requests]
        results = await asyncio.gather(*(scheduler.result(j) for j in jobs))
        await scheduler.stop()
        assert scheduler.batches_run < len(requests)
        return [r.text for r in results]

    assert run(go) == solo
    assert "adapterhub_batch_adapters_bucket" in metrics.render()


def test_streaming_jobs_get_increments_that_add_up(engine: Engine) -> None:
    requests = [request(f"lora{i}", tokens=10) for i in range(3)]

    async def go() -> list[tuple[int, str, str]]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=50))
        jobs = [scheduler.submit(r, "m", streaming=True) for r in requests]
        quiet = scheduler.submit(requests[0], "m")

        async def collect(job: Job) -> tuple[int, str, str]:
            events = [e async for e in scheduler.stream(job)]
            assert events[-1].result is not None
            return len(events), "".join(e.text for e in events), events[-1].result.text

        out = await asyncio.gather(*(collect(j) for j in [*jobs, quiet]))
        await scheduler.stop()
        return out

    *streams, quiet = run(go)
    for count, joined, final in streams:
        assert joined == final and count > 1
    assert quiet[0] == 1 and quiet[2] == streams[0][2]


def test_one_bad_request_does_not_fail_its_batch(engine: Engine) -> None:
    # The server checks lengths before queueing; here the engine itself must refuse this row.
    too_long = request("lora1", prompt="x" * (engine.context_length + 1))
    good = [request(f"lora{i}", prompt=f"p{i}") for i in range(4)]
    solo = [engine.generate([r])[0].text for r in good]

    async def go() -> tuple[list[str], BaseException | None]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=200))
        jobs = [scheduler.submit(r, "m") for r in [good[0], too_long, *good[1:]]]
        outcomes = await asyncio.gather(*(scheduler.result(j) for j in jobs), return_exceptions=True)
        await scheduler.stop()
        bad = outcomes.pop(1)
        texts = [o.text for o in outcomes if not isinstance(o, BaseException)]
        return texts, bad if isinstance(bad, BaseException) else None

    texts, error = run(go)
    assert texts == solo
    assert isinstance(error, AdapterHubError)


def test_timeout_cancels_and_the_engine_moves_on(engine: Engine) -> None:
    release = threading.Event()

    async def go() -> str:
        scheduler = Scheduler(engine, SchedulerConfig(timeout_s=0.2))
        blocker = asyncio.ensure_future(scheduler.call(lambda: release.wait(5)))
        await asyncio.sleep(0)  # the blocking call is queued first
        late = scheduler.submit(request("lora1"), "lora1")
        with pytest.raises(RequestTimeoutError):
            await scheduler.result(late)
        assert late.cancelled.is_set()
        release.set()
        with pytest.raises(RequestTimeoutError):  # the blocking call overran the limit as well
            await blocker
        fresh = Scheduler(engine, SchedulerConfig(timeout_s=30))
        text = (await fresh.result(fresh.submit(request("lora1"), "lora1"))).text
        await asyncio.gather(scheduler.stop(), fresh.stop())
        return text

    assert run(go) == engine.generate([request("lora1")])[0].text


def test_calls_run_in_arrival_order_between_batches(engine: Engine) -> None:
    async def go() -> tuple[bool, bool]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0))
        holder: dict[str, Job] = {}
        first = asyncio.ensure_future(scheduler.call(lambda: "job" in holder and holder["job"].finished))
        await asyncio.sleep(0)  # the first call is queued
        holder["job"] = job = scheduler.submit(request("lora2"), "lora2")
        second = asyncio.ensure_future(scheduler.call(lambda: job.finished))
        await scheduler.result(job)
        seen = await first, await second
        await scheduler.stop()
        return seen

    assert run(go) == (False, True)


def test_shutdown_drains_queued_work_then_refuses(engine: Engine) -> None:
    requests = [request(f"lora{i}", tokens=4) for i in range(5)]
    solo = [engine.generate([r])[0].text for r in requests]

    async def go() -> list[str]:
        scheduler = Scheduler(engine, SchedulerConfig(drain_s=60))
        jobs = [scheduler.submit(r, "m") for r in requests]
        waiting = [asyncio.ensure_future(scheduler.result(j)) for j in jobs]
        await scheduler.stop()
        with pytest.raises(OverloadedError):
            scheduler.submit(requests[0], "m")
        return [(await w).text for w in waiting]

    assert run(go) == solo


def test_shutdown_past_the_deadline_fails_what_is_left(engine: Engine) -> None:
    release = threading.Event()

    async def go() -> None:
        scheduler = Scheduler(engine, SchedulerConfig(drain_s=0.1))
        blocker = asyncio.ensure_future(scheduler.call(lambda: release.wait(5)))
        await asyncio.sleep(0)  # the blocking call is queued first
        job = scheduler.submit(request("lora3"), "lora3")
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(scheduler.stop())
        await asyncio.sleep(0.3)
        release.set()
        await stopping
        await blocker
        with pytest.raises(OverloadedError):
            await scheduler.result(job)

    started = time.monotonic()
    run(go)
    assert time.monotonic() - started < 60


def test_a_full_queue_refuses_with_503(engine: Engine) -> None:
    release = threading.Event()

    async def go() -> None:
        scheduler = Scheduler(engine, SchedulerConfig(max_queue=2, window_ms=0))
        blocker = asyncio.ensure_future(scheduler.call(lambda: release.wait(5)))
        await asyncio.sleep(0.05)  # the engine thread is inside the blocking call; the queue is empty
        waiting = [scheduler.submit(request("lora1", tokens=2), "m") for _ in range(2)]
        with pytest.raises(OverloadedError, match="queue is full"):
            scheduler.submit(request("lora1"), "m")
        release.set()
        await blocker
        await asyncio.gather(*(scheduler.result(j) for j in waiting))
        scheduler.submit(request("lora1", tokens=2), "m")  # room again
        await scheduler.stop()

    run(go)


class CountingEngine:
    """The real engine, counting the stream events it produces."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def generate_stream(self, requests: list[Request]) -> Iterator[StreamEvent]:
        for event in self.engine.generate_stream(requests):
            self.events += 1
            yield event


def test_a_dropped_stream_stops_its_dynamic_batch_early(engine: Engine) -> None:
    counting = CountingEngine(engine)
    long = Request(prompt="go", adapter="lora1", sampling=SamplingParams(max_new_tokens=200, stop_at_eos=False))

    async def go() -> None:
        scheduler = Scheduler(cast(ServingEngine, counting), SchedulerConfig(continuous=False))
        job = scheduler.submit(long, "lora1", streaming=True)
        events = scheduler.stream(job)
        first = await events.__anext__()
        assert not first.finished
        await events.aclose()  # what a client disconnect does to the response generator
        assert job.cancelled.is_set()
        await scheduler.call(lambda: None)  # runs once the batch has stopped
        await scheduler.stop()

    run(go)
    assert 1 <= counting.events < 200


def test_an_abandoned_non_streaming_row_stops_its_dynamic_batch(engine: Engine) -> None:
    """The short row answers, then the long row's client goes (the route cancels its job): every job of the
    batch is done or abandoned, so the batch stops instead of decoding the long row to its end."""
    counting = CountingEngine(engine)
    short = Request(prompt="quick", adapter="lora2", sampling=SamplingParams(max_new_tokens=3, stop_at_eos=False))
    long = Request(prompt="go on", adapter="lora1", sampling=SamplingParams(max_new_tokens=200, stop_at_eos=False))

    async def go() -> None:
        scheduler = Scheduler(cast(ServingEngine, counting), SchedulerConfig(continuous=False, window_ms=0))
        gate = threading.Event()
        held = asyncio.ensure_future(scheduler.call(lambda: gate.wait(30)))
        await asyncio.sleep(0.05)
        jobs = [scheduler.submit(short, "lora2"), scheduler.submit(long, "lora1")]
        gate.set()
        await held
        await scheduler.result(jobs[0])
        jobs[1].cancelled.set()  # what the route does when the client disconnects
        await scheduler.call(lambda: None)  # runs once the batch has stopped
        assert scheduler.batches_run == 1
        await scheduler.stop()

    run(go)
    assert counting.events < 100, f"the abandoned row kept its batch decoding ({counting.events} events)"


def test_concurrent_classifications_share_a_batch(engine: Engine) -> None:
    texts = [f"review {i}: fine" for i in range(6)]
    alone = [engine.classify([Request(prompt=t, adapter="sentiment")])[0] for t in texts]
    metrics = ServerMetrics()

    async def go() -> list[list[str]]:
        scheduler = Scheduler(engine, SchedulerConfig(), metrics)
        release = threading.Event()
        blocker = asyncio.ensure_future(scheduler.call(lambda: release.wait(5)))
        await asyncio.sleep(0)  # the classifications queue up behind the blocking call
        calls = [asyncio.ensure_future(scheduler.classify([Request(prompt=t, adapter="sentiment")
                                                           for t in texts[i:i + 2]])) for i in range(0, 6, 2)]
        bad = asyncio.ensure_future(scheduler.classify([Request(prompt="x", adapter="lora1")]))
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        with pytest.raises(AdapterHubError):
            await bad
        out = [[r.label for r in await c] for c in calls]
        await scheduler.stop()
        return out

    labels = run(go)
    assert [label for part in labels for label in part] == [r.label for r in alone]
    count = next(line for line in metrics.render().splitlines() if line.startswith("adapterhub_batch_size_count"))
    assert float(count.split()[-1]) == 1  # three calls and a bad one: one combined batch, then solo retries
