"""What the server needs from the inference engine, as a :class:`Protocol`.

The server never reaches into the engine's internals: it batches :class:`~adapterhub_local.inference.types.Request`
objects and hands them over through these methods, all called from the scheduler's single engine thread
(the engine is not asked to be thread-safe). ``adapterhub_local.inference.engine.Engine`` satisfies it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from adapterhub_local.inference.types import (
    AdapterInfo,
    ClassificationResult,
    GenerationResult,
    PoolStats,
    Request,
    StreamEvent,
)


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
    def tokenizer(self) -> Any: ...

    def set_mode(self, mode: str) -> None: ...

    def generate(self, requests: Sequence[Request]) -> list[GenerationResult]: ...

    def generate_stream(self, requests: Sequence[Request]) -> Iterator[StreamEvent]: ...

    def classify(self, requests: Sequence[Request]) -> list[ClassificationResult]: ...

    def load(self, ref: str) -> AdapterInfo: ...

    def unload(self, ref: str) -> None: ...

    def pin(self, ref: str, pinned: bool = True) -> AdapterInfo: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def pool_stats(self) -> PoolStats: ...
