"""A process-wide switch that turns one of the engine's CPU fast paths off for a block, nesting, from any thread:
the side-by-side baselines of ``benchmarks/serving.py`` (the same engine with and without the path)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Suspension:
    """Counts the open :meth:`block` contexts; the path it guards is off while any is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0

    @property
    def active(self) -> bool:
        """Whether some block is open now (callers take the plain path)."""
        return self._depth > 0

    @contextmanager
    def block(self) -> Iterator[None]:
        with self._lock:
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
