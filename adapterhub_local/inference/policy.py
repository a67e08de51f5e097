"""``mode="auto"``: merge while one adapter carries nearly all recent traffic, swap otherwise.

The policy watches a sliding window of the adapters that recent requests asked for. When one LoRA
adapter holds at least ``threshold`` of a full-enough window, merging it gives zero-overhead serving;
any other mix is served in swap mode. Decisions only change on the window's evidence, so a stray request
does not flip the mode back and forth (and a batch that mixes in other adapters is served in swap mode
without changing the decision).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

log = logging.getLogger("adapterhub_local.inference")


@dataclass
class AutoPolicy:
    """Sliding-window traffic policy."""

    window: int = 64
    """How many recent requests to look at."""
    threshold: float = 0.9
    """Share of the window one adapter must hold to be merged."""
    min_requests: int = 16
    """No merging before this many requests were seen."""
    recent: deque[str | None] = field(default_factory=deque)
    decision: str | None = None
    """The adapter to merge now, or ``None`` for swap mode."""

    def observe(self, refs: list[str | None]) -> None:
        for ref in refs:
            self.recent.append(ref)
            while len(self.recent) > self.window:
                self.recent.popleft()

    def decide(self, mergeable: set[str]) -> str | None:
        """Update and return the decision; ``mergeable``: adapters that can be merged (LoRA, not soft prompts)."""
        choice: str | None = None
        if len(self.recent) >= self.min_requests:
            ref, count = Counter(self.recent).most_common(1)[0]
            if ref is not None and ref in mergeable and count >= self.threshold * len(self.recent):
                choice = ref
        if choice != self.decision:
            log.info("auto policy: %s -> %s (%d recent requests)", _mode(self.decision), _mode(choice),
                     len(self.recent))
            self.decision = choice
        return choice


def _mode(ref: str | None) -> str:
    return "swap" if ref is None else f"merge {ref}"
