"""Per-adapter usage: load latency, merges, rows and tokens served — and a report whose label set is bounded.

The ledger keeps one small record per adapter it has seen (a handful of numbers; an adapter unloaded from every
tier keeps its counts). A report names at most ``top_k`` adapters — those with the most traffic (rows, then
tokens; ties by name, so the choice is deterministic) — and sums every other adapter into one ``other`` entry,
so a metrics scrape never carries more than ``top_k + 1`` adapter label values however many adapters a server
sees. Because the ranking is taken at report time an adapter can move between its own entry and ``other``;
the sum over all entries of each count only grows.

Thread safety: one lock; the engine thread records, a metrics thread reports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

OTHER = "other"
"""The label of the entry that sums every adapter outside the top ``K``."""
DEFAULT_TOP_K = 20


@dataclass
class AdapterUsage:
    """One adapter's counts (or, for ``other``, their sum)."""

    rows: int = 0
    """Requests served (rows of batches)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    loads: int = 0
    """Loads from the registry on disk (a host-cache hit is not a load)."""
    load_seconds: float = 0.0
    """Total time those loads took (read, verify, prepare)."""
    last_load_seconds: float = 0.0
    merges: int = 0
    """Times merge mode merged it into the weights."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: AdapterUsage) -> None:
        self.rows += other.rows
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.loads += other.loads
        self.load_seconds += other.load_seconds
        self.last_load_seconds = max(self.last_load_seconds, other.last_load_seconds)
        self.merges += other.merges


@dataclass
class UsageEntry:
    """One line of a report: an adapter (or ``other``), where it lives now, and its counts."""

    adapter: str
    residency: str
    """``device`` | ``host`` | ``disk``; for ``other``: ``mixed``."""
    usage: AdapterUsage
    adapters: int = 1
    """How many adapters the entry covers (``other`` sums several)."""

    def as_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "residency": self.residency, "adapters": self.adapters,
                **asdict(self.usage)}


@dataclass
class UsageReport:
    """The top adapters by traffic, then ``other`` (present when any adapter fell outside the top)."""

    entries: list[UsageEntry] = field(default_factory=list)
    residency: dict[str, int] = field(default_factory=dict)
    """How many known adapters are on the device, on the host, on disk (all of them, not only the top)."""


class UsageLedger:
    """Per-adapter counters, recorded by the engine (loads, merges) and the server (rows, tokens)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[str, AdapterUsage] = {}

    def _entry(self, ref: str) -> AdapterUsage:
        usage = self._usage.get(ref)
        if usage is None:
            usage = self._usage[ref] = AdapterUsage()
        return usage

    def loaded(self, ref: str, seconds: float) -> None:
        with self._lock:
            usage = self._entry(ref)
            usage.loads += 1
            usage.load_seconds += seconds
            usage.last_load_seconds = seconds

    def merged(self, ref: str) -> None:
        with self._lock:
            self._entry(ref).merges += 1

    def served(self, ref: str, rows: int = 1, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self._lock:
            usage = self._entry(ref)
            usage.rows += rows
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens

    def report(self, top_k: int, tier: Callable[[str], str]) -> UsageReport:
        """The ``top_k`` adapters by traffic plus ``other``; ``tier(ref)`` says where an adapter lives now."""
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {top_k})")
        with self._lock:
            items = [(ref, AdapterUsage(**asdict(u))) for ref, u in self._usage.items()]
        items.sort(key=lambda item: (-item[1].rows, -item[1].tokens, item[0]))
        report = UsageReport()
        tiers = {ref: tier(ref) for ref, _ in items}
        for where in tiers.values():
            report.residency[where] = report.residency.get(where, 0) + 1
        report.entries = [UsageEntry(ref, tiers[ref], usage) for ref, usage in items[:top_k]]
        rest = items[top_k:]
        if rest:
            total = AdapterUsage()
            for _, usage in rest:
                total.add(usage)
            report.entries.append(UsageEntry(OTHER, "mixed", total, adapters=len(rest)))
        return report
