"""Disconnects release everything: a storm of clients quitting at random points of their request's life
(mid-body, before, during or after decoding, streaming or not) leaves no open row, no busy adapter and no
queued work; merging then succeeds and a probe gets its solo answer. A non-streaming request whose client
has gone stops decoding."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx

from adapterhub_local.inference.continuous import OpenBatch
from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request, SamplingParams, StreamEvent
from adapterhub_local.registry import Registry
from adapterhub_local.server import ServerConfig, create_app
from adapterhub_local.server.auth import AuthConfig
from tests.server.conftest import API_KEY, live_server

CLIENTS = 200


def wait_until_idle(engine: Engine, app: Any, seconds: float = 30.0) -> None:
    """Wait (bounded) until the engine holds no row and the scheduler no work."""
    scheduler = app.state.server.scheduler
    deadline = time.monotonic() + seconds
    while engine.open_rows or engine.pool.busy or scheduler.queued:
        assert time.monotonic() < deadline, (f"left behind: {engine.open_rows} rows, busy {engine.pool.busy}, "
                                             f"{scheduler.queued} queued")
        time.sleep(0.05)


async def client(port: int, rng: random.Random, index: int) -> str:
    """One client that quits at a random point; returns how it ended."""
    stream = rng.random() < 0.5
    path = "/v1/chat/completions" if index % 3 == 0 else "/v1/completions"
    body: dict[str, Any] = {"model": f"lora{index % 16}" if index % 7 else "soft", "max_tokens": rng.randint(20, 120),
                            "temperature": 0, "stream": stream}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": f"client {index}"}]
    else:
        body["prompt"] = f"client {index} says"
    raw = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    point = rng.choice(["mid-body", "at-once", "waiting", "reading", "complete"])
    try:
        if point == "mid-body":
            writer.write(head + raw[: len(raw) // 2])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.2))
            return point
        writer.write(head + raw)
        await writer.drain()
        if point == "waiting":
            await asyncio.sleep(rng.uniform(0, 0.6))
        elif point == "reading":
            await reader.read(rng.randint(1, 400))
        elif point == "complete":
            await asyncio.wait_for(reader.read(), 60)
        return point
    finally:
        writer.close()


async def storm(port: int) -> list[str]:
    rng = random.Random(1234)
    seeds = [random.Random(rng.random()) for _ in range(CLIENTS)]
    return await asyncio.gather(*(asyncio.wait_for(client(port, seeds[i], i), 90) for i in range(CLIENTS)))


def test_a_disconnect_storm_leaves_nothing_behind(served_registry: Registry) -> None:
    probe = Request(prompt="probe after the storm", adapter="lora1",
                    sampling=SamplingParams(max_new_tokens=8, temperature=0.0))
    expected = Engine(served_registry, "tiny", mode="swap").generate([probe])[0]
    engine = Engine(served_registry, "tiny", mode="swap")
    app = create_app(engine, served_registry, "tiny", ServerConfig(auth=AuthConfig(api_key=API_KEY)))
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        endings = asyncio.run(storm(port))
        assert {"mid-body", "at-once", "waiting", "reading", "complete"} <= set(endings)
        wait_until_idle(engine, app)
        engine.pool.rows.check()
        assert engine.open_rows == 0 and not engine.pool.busy
        engine.merge("lora1")  # refused while any row holds an adapter
        engine.unmerge()
        response = httpx.post(f"{url}/v1/completions", json={"model": "lora1", "prompt": probe.prompt,
                                                              "max_tokens": 8, "temperature": 0}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected.text
        assert engine.open_rows == 0 and not engine.pool.busy


class SlowBatch(OpenBatch):
    """An open batch whose steps take a while, so that a request is still decoding when its client leaves."""

    def step(self) -> list[StreamEvent]:
        time.sleep(0.05)
        return super().step()


class SlowEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[SlowBatch] = []

    def open_batch(self, max_rows: int = 64, max_wait_steps: int = 3, fuse_budget: int = 32) -> OpenBatch:
        self.batches.append(SlowBatch(self, max_rows, max_wait_steps, fuse_budget))
        return self.batches[-1]


def test_a_non_streaming_request_whose_client_left_stops_decoding(served_registry: Registry) -> None:
    engine = SlowEngine(served_registry, "tiny", mode="swap")
    app = create_app(engine, served_registry, "tiny", ServerConfig(auth=AuthConfig(api_key=API_KEY)))
    tokens = 80  # 80 steps of at least 50 ms: 4 s if it ran to the end
    model, prompt = next((f"lora{i}", f"a long answer {k}") for i in range(16) for k in range(8)
                         if engine.generate([Request(prompt=f"a long answer {k}", adapter=f"lora{i}",
                                                     sampling=SamplingParams(max_new_tokens=tokens))])[0]
                         .finish_reason == "length")  # a request that does not stop early at EOS

    async def leave_early(port: int) -> None:
        raw = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}).encode()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw)
        await writer.drain()
        deadline = time.monotonic() + 30
        while not engine.open_rows:  # decoding has started
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        writer.close()

    with live_server(app) as url:
        asyncio.run(leave_early(int(url.rsplit(":", 1)[1])))
        wait_until_idle(engine, app, seconds=tokens * 0.05)
        steps = sum(b.steps for b in engine.batches)
        assert steps < tokens // 2, f"the abandoned request decoded {steps} of its {tokens} tokens"


def test_rows_leaving_beside_a_finished_row_awaiting_reclaim_release_it(served_registry: Registry) -> None:
    """The last live rows of an open batch leave (their clients went) while a finished row still waits for its
    cache row to be reclaimed: the batch must release that row too, not keep it (and its adapter) forever."""
    from adapterhub_local.server.scheduler import Scheduler, SchedulerConfig

    engine = Engine(served_registry, "tiny", mode="swap")
    short = Request(prompt="short", adapter="lora3", sampling=SamplingParams(max_new_tokens=1, stop_at_eos=False))

    def long(i: int) -> Request:
        return Request(prompt=f"long {i}", adapter="lora4", sampling=SamplingParams(max_new_tokens=150,
                                                                                   stop_at_eos=False))

    async def go() -> None:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0))
        for _ in range(3):
            jobs = [scheduler.submit(r, "m", streaming=True) for r in (short, long(1), long(2))]
            streams = [scheduler.stream(j) for j in jobs]
            assert (await streams[0].__anext__()).finished  # the short row is done; its cache row stays
            for stream in streams[1:]:
                await stream.__anext__()  # decoding
            for stream in streams[1:]:
                await stream.aclose()  # the clients go
            rows = await scheduler.call(lambda: (engine.open_rows, engine.pool.busy))
            assert rows == (0, {}), f"left behind: {rows}"
        await scheduler.stop()

    asyncio.run(asyncio.wait_for(go(), 60))
