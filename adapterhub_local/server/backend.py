"""What the server needs from the inference engine, as a :class:`Protocol`.

The server never reaches into the engine's internals: it batches :class:`~adapterhub_local.inference.types.Request`
objects and hands them over through these methods, all called from the scheduler's single engine thread
(only ``stats`` is read from other threads, at scrape time). ``adapterhub_local.inference.engine.Engine`` satisfies it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol, runtime_checkable

from adapterhub_local.inference.types import (
    AdapterInfo,
    ClassificationResult,
    GenerationResult,
    PoolStats,
    Request,
    StreamEvent,
)
from adapterhub_local.inference.usage import DEFAULT_TOP_K, UsageLedger, UsageReport

Mode = Literal["swap", "merge", "auto"]


@runtime_checkable
class ServingEngine(Protocol):
    """The engine's surface used by the HTTP server."""

    @property
    def mode(self) -> str:
        """``merge`` | ``swap`` | ``auto``."""
        ...

    @property
    def context_length(self) -> int:
        """Maximum tokens (prompt + virtual tokens + new tokens) one row may hold."""
        ...

    @property
    def tokenizer(self) -> object: ...

    def set_mode(self, mode: Mode) -> None: ...

    def generate(self, requests: list[Request]) -> list[GenerationResult]: ...

    def generate_stream(self, requests: list[Request]) -> Iterator[StreamEvent]: ...

    def classify(self, requests: list[Request]) -> list[ClassificationResult]: ...

    def load(self, ref: str, pin: bool = False) -> AdapterInfo: ...

    def unload(self, ref: str) -> None: ...

    def pin(self, ref: str) -> AdapterInfo: ...

    def unpin(self, ref: str) -> None: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def stats(self) -> PoolStats:
        """A copy of the adapter pool's counters (safe to call from any thread)."""
        ...

    @property
    def usage(self) -> UsageLedger:
        """Per-adapter counters; the server records rows and tokens served (any thread)."""
        ...

    def usage_report(self, top_k: int = DEFAULT_TOP_K) -> UsageReport:
        """Top adapters by traffic plus ``other``, each with its residency (safe to call from any thread)."""
        ...
