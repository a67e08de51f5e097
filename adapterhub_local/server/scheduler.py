"""Dynamic and continuous batching: concurrent requests, whatever their adapters, become the engine's mixed
batches.

Continuous (token-level) batching is the default where the engine supports it (swap mode, and auto mode while
its policy swaps): see :mod:`adapterhub_local.server.continuous`. Otherwise (merge mode, auto mode with an
adapter merged, or ``continuous=False``) the scheduler batches dynamically, as follows.

One engine thread owns the engine. Requests arrive from the event loop into a queue; the thread waits a short
window after the oldest waiting request (only when the engine was idle and traffic is concurrent: requests
that queued behind a running batch go at once, a lone client never waits), takes up to ``max_batch`` of them
and runs them as one mixed batch through the engine's streaming iterator, delivering every increment to its
request's asyncio queue. (In ``merge`` mode the engine itself runs a mixed batch adapter group by adapter
group.)

Other engine work runs on the same thread between batches, in arrival order, so the engine is never used from
two threads: consecutive classification requests as one engine batch, admin calls and listings one by one.

Failure isolation: if a batch fails, each request that has not yet received output is re-run alone, so one bad
request never fails its neighbours. Timeouts and disconnects mark a request cancelled; a batch whose requests
are all cancelled stops early. Shutdown refuses new work, drains what is queued (up to a deadline) and fails
the rest with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from adapterhub_local.inference.types import ClassificationResult, GenerationResult, Request, StreamEvent
from adapterhub_local.server.backend import ServingEngine
from adapterhub_local.server.continuous import open_batch_factory, run_continuous
from adapterhub_local.server.errors import OverloadedError, RequestTimeoutError
from adapterhub_local.server.metrics import ServerMetrics

log = logging.getLogger("adapterhub.server")
T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching and time limits."""

    window_ms: float = 4.0
    """How long an idle engine waits after the first request for others to join its batch."""
    max_batch: int = 64
    """Most rows in one engine batch."""
    max_queue: int = 4096
    """Most waiting requests; beyond that new ones get a 503."""
    timeout_s: float = 300.0
    """Per-request limit from arrival to the last token (504 after it)."""
    drain_s: float = 30.0
    """On shutdown, how long queued work may still run."""
    continuous: bool = True
    """Token-level batching (swap mode, auto mode while swapping): requests join the running batch at the next
    decode step and leave when done (:mod:`adapterhub_local.server.continuous`); off, or while merged: dynamic
    batching."""


@dataclass(eq=False)
class Job:
    """One generation request in flight; the engine thread fills ``events`` through ``loop``."""

    request: Request
    model: str
    loop: asyncio.AbstractEventLoop
    deadline: float
    streaming: bool = False
    """Deliver every increment; otherwise only the final event (one wake-up of the event loop per request)."""
    arrived: float = field(default_factory=time.monotonic)
    events: asyncio.Queue[StreamEvent | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    delivered: bool = False
    """Some output reached the client side (so re-running the request would repeat it)."""
    finished: bool = False

    def deliver(self, item: StreamEvent | BaseException) -> None:
        """Called from the engine thread. A row that failed alone (``item.error``) ends the job with that
        error; nothing is delivered after the last item."""
        if self.finished:
            return
        if isinstance(item, StreamEvent) and item.error is not None:
            item = item.error
        last = isinstance(item, BaseException) or item.finished
        if not (last or self.streaming):
            return
        self.delivered = True
        self.finished = self.finished or last
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass(eq=False)
class Call:
    """Any other engine work, run on the engine thread between batches."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop

    def settle(self) -> None:
        try:
            value = self.fn()
        except BaseException as exc:  # delivered to the awaiting request, which maps it to a status
            self.loop.call_soon_threadsafe(_set_exception, self.future, exc)
        else:
            self.loop.call_soon_threadsafe(_set_result, self.future, value)


@dataclass(eq=False)
class Classify:
    """A classification request; consecutive ones are run as one engine call."""

    requests: list[Request]
    future: asyncio.Future[list[ClassificationResult]]
    loop: asyncio.AbstractEventLoop

    def settle(self, value: list[ClassificationResult] | BaseException) -> None:
        if isinstance(value, BaseException):
            self.loop.call_soon_threadsafe(_set_exception, self.future, value)
        else:
            self.loop.call_soon_threadsafe(_set_result, self.future, value)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_STOP = object()


class Scheduler:
    """Owns the engine thread; ``submit``/``stream``/``result`` from the event loop."""

    def __init__(self, engine: ServingEngine, config: SchedulerConfig | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.metrics = metrics
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._pending: deque[Any] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._abort = threading.Event()
        self._last_rows = 0
        self.batches_run = 0

    # ------------------------------------------------------------------ lifecycle (event loop side)
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="adapterhub-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Refuse new work, let queued work finish within ``drain_s``, then fail what is left."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._inbox.put(_STOP)
        deadline = time.monotonic() + self.config.drain_s
        while thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if thread.is_alive():  # past the deadline: the thread fails what is left and stops after this step
            self._abort.set()
            while thread.is_alive() and time.monotonic() < deadline + 10.0:
                await asyncio.sleep(0.02)
        self._thread = None

    # ----------------------------------------------------- the continuous loop's interface (engine thread)
    @property
    def aborting(self) -> bool:
        """Shutdown passed its deadline: fail live work now."""
        return self._abort.is_set()

    def head(self) -> object | None:
        """The item at the front of the queue (after taking in what has arrived), or ``None``."""
        self._pending.extend(self._drain_inbox())
        return self._pending[0] if self._pending else None

    def take(self) -> object:
        """Remove and return the item at the front (seen with :meth:`head`)."""
        return self._pending.popleft()

    def run_classify(self) -> None:
        """Run the consecutive classification requests at the front (see :meth:`_run_classify`)."""
        self._run_classify()

    def record_batch(self, rows: int, adapters: int, waits: list[float]) -> None:
        """Count a batch (or a join into the open batch) of ``rows`` rows for metrics and the window policy."""
        self.batches_run += 1
        self._last_rows = rows
        if self.metrics is not None:
            self.metrics.batch(rows, adapters, waits)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (approximate: read without a lock, for metrics)."""
        return self._inbox.qsize() + len(self._pending)

    # --------------------------------------------------------------------------- submitting work
    def submit(self, request: Request, model: str, streaming: bool = False) -> Job:
        """Queue a generation; raises 503 when closed or full. Read a ``streaming`` job with
        :meth:`stream`, any job with :meth:`result`."""
        self._admit()
        loop = asyncio.get_running_loop()
        job = Job(request=request, model=model, loop=loop, deadline=time.monotonic() + self.config.timeout_s,
                  streaming=streaming)
        self._inbox.put(job)
        return job

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between batches and return its value (or raise its error)."""
        self._admit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put(Call(fn, future, loop))
        try:
            return await asyncio.wait_for(future, self.config.timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"engine call did not finish within {self.config.timeout_s:g} s",
                                      "retry, or raise the server's --timeout") from exc

    async def classify(self, requests: list[Request]) -> list[ClassificationResult]:
        """Classify on the engine thread; concurrent calls share one engine batch."""
        self._admit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[ClassificationResult]] = loop.create_future()
        self._inbox.put(Classify(list(requests), future, loop))
        try:
            return await asyncio.wait_for(future, self.config.timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"classification did not finish within {self.config.timeout_s:g} s",
                                      "send fewer texts or raise the server's --timeout") from exc

    def _admit(self) -> None:
        if self._closed:
            raise OverloadedError("the server is shutting down", "retry against another instance or later")
        if self._inbox.qsize() + len(self._pending) >= self.config.max_queue:
            raise OverloadedError(f"the queue is full ({self.config.max_queue} requests)", "retry in a moment")
        self.start()

    async def stream(self, job: Job) -> AsyncGenerator[StreamEvent, None]:
        """The job's increments as they come (only the last for a non-streaming job); the last one is
        ``finished`` with the result."""
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                item = await asyncio.wait_for(job.events.get(), remaining)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"request did not finish within {self.config.timeout_s:g} s",
                                      "ask for fewer tokens or raise the server's --timeout") from exc
        finally:
            # Timeout, error, disconnect or done: the engine thread may stop working for this row.
            job.cancelled.set()

    async def result(self, job: Job) -> GenerationResult:
        """Wait for the whole generation."""
        async for event in self.stream(job):
            if event.finished:
                assert event.result is not None, "the engine's last event carries the result"
                return event.result
        raise AssertionError("stream ended without a finished event")

    # ---------------------------------------------------------------------- engine thread side
    def _drain_inbox(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _refuse(self, item: Any, error: BaseException) -> None:
        if isinstance(item, Job):
            item.deliver(error)
        elif isinstance(item, Call):
            item.loop.call_soon_threadsafe(_set_exception, item.future, error)
        elif isinstance(item, Classify):
            item.settle(error)

    def _run(self) -> None:
        stopping = False
        while True:
            if self._abort.is_set():
                error = OverloadedError("the server shut down before this request ran", "retry later")
                for item in [*self._pending, *self._drain_inbox()]:
                    self._refuse(item, error)
                self._pending.clear()
                return
            if not self._pending:
                if stopping:
                    return
                self._pending.append(self._inbox.get())
            self._pending.extend(self._drain_inbox())
            head = self._pending[0]
            if head is _STOP:
                self._pending.popleft()
                stopping = True
                continue
            if isinstance(head, Call):
                self._pending.popleft()
                head.settle()
                continue
            if isinstance(head, Classify):
                self._run_classify()
                continue
            self._gather(head)
            factory = open_batch_factory(self.engine) if self.config.continuous else None
            if factory is not None:
                try:
                    run_continuous(self, factory)
                except Exception:  # the loop fails its own rows; the engine thread must live on
                    log.exception("continuous batching loop failed")
                continue
            batch = self._select()
            if batch:
                self._run_batch(batch)

    def _run_classify(self) -> None:
        """Run the consecutive classification requests at the front as one engine batch (one by one if
        that fails, so a bad request only fails itself)."""
        group: list[Classify] = []
        rows = 0
        while self._pending and isinstance(self._pending[0], Classify):
            size = len(self._pending[0].requests)
            if group and rows + size > self.config.max_batch:
                break
            group.append(self._pending.popleft())
            rows += size
        if self.metrics is not None:
            self.metrics.batch(rows, len({r.adapter for item in group for r in item.requests}), [])
        try:
            results = self.engine.classify([r for item in group for r in item.requests])
        except Exception as exc:
            if len(group) == 1:
                group[0].settle(exc)
                return
            for item in group:
                try:
                    item.settle(self.engine.classify(item.requests))
                except Exception as solo_exc:
                    item.settle(solo_exc)
            return
        start = 0
        for item in group:
            item.settle(results[start:start + len(item.requests)])
            start += len(item.requests)

    def _gather(self, head: Job) -> None:
        """Wait out the window after the oldest request (if it has not already passed) — but only when
        traffic is concurrent (the last batch had company, or others are already waiting): a lone client
        would only pay the window in latency."""
        if self._last_rows <= 1 and sum(isinstance(x, Job) for x in self._pending) <= 1:
            return
        window_end = head.arrived + self.config.window_ms / 1000.0
        while sum(isinstance(x, Job) for x in self._pending) < self.config.max_batch:
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                return
            try:
                self._pending.append(self._inbox.get(timeout=remaining))
            except queue.Empty:
                return

    def _select(self) -> list[Job]:
        """Take consecutive jobs from the front (stopping at a Call or STOP so order is kept)."""
        batch: list[Job] = []
        while self._pending and len(batch) < self.config.max_batch:
            item = self._pending[0]
            if not isinstance(item, Job):
                break
            self._pending.popleft()
            if not item.cancelled.is_set():
                batch.append(item)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        started = time.monotonic()
        self.record_batch(len(batch), len({j.request.adapter for j in batch}), [started - j.arrived for j in batch])
        try:
            self._stream_into(batch)
        except Exception as exc:
            fresh = [j for j in batch if not j.delivered and not j.cancelled.is_set()]
            if len(batch) > 1 and fresh:
                log.warning("batch failed; re-running its requests one by one",
                            extra={"fields": {"rows": len(batch), "error": f"{type(exc).__name__}: {exc}"}})
                for job in batch:
                    if job.delivered and not job.finished:
                        job.deliver(exc)
                for job in fresh:
                    try:
                        self._stream_into([job])
                    except Exception as solo_exc:
                        job.deliver(solo_exc)
            else:
                for job in batch:
                    if not job.finished:
                        job.deliver(exc)

    def _stream_into(self, batch: list[Job]) -> None:
        events = self.engine.generate_stream([j.request for j in batch])
        try:
            for event in events:
                job = batch[event.index]
                if not job.cancelled.is_set():
                    job.deliver(event)
                elif event.finished:
                    job.finished = True
                if self._abort.is_set():
                    error = OverloadedError("the server shut down while this request ran", "retry later")
                    for j in batch:
                        if not j.finished:
                            j.deliver(error)
                    return
                if all(j.cancelled.is_set() for j in batch):
                    return
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
