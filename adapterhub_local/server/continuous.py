"""Continuous batching on the scheduler's engine thread: requests join the engine's open decode batch at the next
step and leave the moment they finish.

The scheduler hands over when a generation job is at the front of its queue and the engine can keep an open
batch (swap mode, or auto mode while its policy swaps). From then on, before every decode step, the jobs at
the front of the queue join (prefilled in that step, in one forward with the live rows' decode; as many as
fit: ``max_batch`` rows, and their adapters in the pool beside the live rows' ones; a job that does not fit
waits, in order, for rows to leave), consecutive classification requests run between steps, and every row's
events go to its job as they come, so a short request returns as soon as its own tokens are done and a
streaming client sees each token at once. An admin call or shutdown marker at the front stops admissions; the
live rows finish and the scheduler runs it (the engine's weights and pool must not change under live rows). In
auto mode, once the policy decides to merge (one adapter carries nearly all traffic) admissions stop too: the
batch drains and the scheduler's next batches run with that adapter merged.

Failure isolation: a group of joiners that fails is joined again one by one, so a bad request only fails
itself; a row that fails alone in a step (non-finite logits) ends with its error while the others go on; a
failing step fails the rows it carried. Cancelled jobs (timeout, disconnect) leave the batch at the next
step. On abort (shutdown past its deadline) the live rows fail with a 503. However the loop ends, it closes
the open batch, which releases every row it still holds (the engine's row ledger owns that invariant).

The loop uses the scheduler's and the open batch's public interfaces only (``head``/``take``,
``run_classify``, ``record_batch``, ``aborting``; ``fits``/``join``/``step``/``leave``/``close``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from itertools import count
from typing import TYPE_CHECKING, Any, Protocol

from adapterhub_local.inference.types import Request, StreamEvent
from adapterhub_local.server.errors import OverloadedError

if TYPE_CHECKING:
    from adapterhub_local.server.scheduler import Job, Scheduler

log = logging.getLogger("adapterhub.server")


class DecodeBatch(Protocol):
    """The engine's open batch (:class:`adapterhub_local.inference.continuous.OpenBatch`)."""

    def __len__(self) -> int: ...

    def fits(self, requests: list[Request]) -> bool: ...

    def join(self, requests: list[Request], keys: list[int]) -> None: ...

    def step(self) -> list[StreamEvent]: ...

    def leave(self, key: int) -> bool: ...

    def close(self) -> None: ...


def open_batch_factory(engine: object) -> Callable[[int], DecodeBatch] | None:
    """The engine's ``open_batch`` when it can batch continuously now (swap mode, an editable KV cache),
    else ``None``."""
    factory = getattr(engine, "open_batch", None)
    if factory is None or not getattr(engine, "can_open_batch", False):
        return None
    return factory


class ContinuousLoop:
    """Runs one open batch until it empties (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, batch: DecodeBatch) -> None:
        self.scheduler = scheduler
        self.batch = batch
        self.live: dict[int, Job] = {}
        self._keys = count()

    def run(self) -> None:
        """Admit, step and deliver until no row is live and no job at the front can join. However it ends,
        the open batch is closed, so every row it held is released (adapters no longer busy, KV rows freed)."""
        from adapterhub_local.server.scheduler import Classify, Job

        scheduler = self.scheduler
        try:
            while True:
                if scheduler.aborting:
                    self._fail_all(OverloadedError("the server shut down while this request ran", "retry later"))
                    return
                while self.live and isinstance(scheduler.head(), Classify):
                    scheduler.run_classify()  # between steps: the live rows' adapters are busy, never evicted
                admitted: list[Job] = []
                draining = not getattr(scheduler.engine, "can_open_batch", True)  # auto mode now wants to merge
                while not draining:
                    job = scheduler.head()
                    if not isinstance(job, Job):
                        break
                    if job.cancelled.is_set():
                        scheduler.take()
                        continue
                    try:
                        fits = self.batch.fits([j.request for j in admitted] + [job.request])
                    except Exception as exc:  # e.g. an unknown adapter: this job alone fails
                        scheduler.take()
                        job.deliver(exc)
                        continue
                    if not fits:
                        break
                    scheduler.take()
                    admitted.append(job)
                if admitted:
                    self._join(admitted)
                if not self.live:
                    return
                self._step()
        finally:
            if self.live:  # an unexpected error in the loop itself: nobody is left hanging
                self._fail_all(RuntimeError("the decode loop stopped"))
            self.batch.close()  # finished rows awaiting reclaim, rows of cancelled jobs: all released

    def _join(self, jobs: list[Job]) -> None:
        keys = [next(self._keys) for _ in jobs]
        try:
            self.batch.join([j.request for j in jobs], keys)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].deliver(exc)
                return
            log.warning("joining a group failed; joining its requests one by one",
                        extra={"fields": {"rows": len(jobs), "error": f"{type(exc).__name__}: {exc}"}})
            for job in jobs:
                self._join([job])
            return
        now = time.monotonic()
        adapters = {j.request.adapter for j in self.live.values()} | {j.request.adapter for j in jobs}
        self.scheduler.record_batch(len(self.batch), len(adapters), [now - j.arrived for j in jobs])
        self.live.update(zip(keys, jobs, strict=True))

    def _step(self) -> None:
        for key, job in list(self.live.items()):
            if job.cancelled.is_set():
                self.batch.leave(key)
                del self.live[key]
        if not self.live:
            return
        try:
            events = self.batch.step()
        except Exception as exc:
            log.error("decode step failed", extra={"fields": {"rows": len(self.live),
                                                              "error": f"{type(exc).__name__}: {exc}"}})
            self._fail_all(exc)
            return
        self._deliver(events)

    def _deliver(self, events: list[StreamEvent]) -> None:
        for event in events:
            job = self.live.get(event.index)
            if job is None:
                continue
            if not job.cancelled.is_set():
                job.deliver(event)
            if event.finished:
                job.finished = True
                del self.live[event.index]
        for key, job in list(self.live.items()):  # a job whose client left during this step leaves now
            if job.cancelled.is_set():
                self.batch.leave(key)
                del self.live[key]

    def _fail_all(self, error: BaseException) -> None:
        for job in self.live.values():
            if not job.finished:
                job.deliver(error)
        self.live.clear()
        self.batch.close()


def run_continuous(scheduler: Scheduler, factory: Callable[[int], Any]) -> None:
    """Open a batch of up to ``max_batch`` rows and run it until it empties."""
    ContinuousLoop(scheduler, factory(scheduler.config.max_batch)).run()
