"""Prometheus metrics in the text exposition format (version 0.0.4), with no dependency.

Counters and histograms carry labels; the adapter pool's counters are read from the engine at scrape
time, and so are the per-adapter series (``adapterhub_adapter_*``, :func:`render_usage`): residency, loads and
load latency, merges, rows and tokens for the ``K`` adapters with the most traffic plus one ``adapter="other"``
series summing the rest — at most ``K + 1`` adapter label values, however many adapters the server has seen.
Everything is guarded by one lock: updates come from the event loop and the engine thread.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from adapterhub_local.inference.usage import UsageReport

LabelKey = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = [*key, *extra]
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _key(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


@dataclass
class Counter:
    name: str
    help: str
    values: dict[LabelKey, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    series: dict[LabelKey, tuple[list[int], list[float]]] = field(default_factory=dict)

    def observe(self, value: float, **labels: str) -> None:
        key = _key(labels)
        counts, sums = self.series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        sums[0] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, sums) in sorted(self.series.items()):
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                lines.append(f"{self.name}_bucket{_labels(key, [('le', _number(bound))])} {running}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(sums[0])}")
            lines.append(f"{self.name}_count{_labels(key)} {running}")
        return lines


class ServerMetrics:
    """The server's instruments. ``pool_stats`` is called at scrape time for the engine's pool counters."""

    def __init__(self, pool_stats: Callable[[], Mapping[str, float]] | None = None,
                 usage_report: Callable[[], UsageReport] | None = None) -> None:
        self._lock = threading.Lock()
        self._pool_stats = pool_stats
        self._usage_report = usage_report
        self.requests = Counter("adapterhub_requests_total", "Requests by endpoint, model and HTTP status.")
        self.prompt_tokens = Counter("adapterhub_prompt_tokens_total", "Prompt tokens processed, by model.")
        self.completion_tokens = Counter("adapterhub_completion_tokens_total", "Tokens generated, by model.")
        self.latency = Histogram("adapterhub_request_latency_seconds", "End-to-end request latency.",
                                 LATENCY_BUCKETS)
        self.queue_wait = Histogram("adapterhub_queue_wait_seconds", "Time from arrival to joining a batch.",
                                    LATENCY_BUCKETS)
        self.batch_size = Histogram("adapterhub_batch_size", "Rows per engine batch.", BATCH_BUCKETS)
        self.batch_adapters = Histogram("adapterhub_batch_adapters", "Distinct adapters per engine batch.",
                                        BATCH_BUCKETS)
        self.gauges: dict[str, tuple[str, float]] = {}

    def request_done(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(endpoint=endpoint, model=model, status=str(status))
            self.latency.observe(seconds, endpoint=endpoint)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens.inc(prompt, model=model)
            self.completion_tokens.inc(completion, model=model)

    def batch(self, rows: int, adapters: int, waits: Iterable[float]) -> None:
        with self._lock:
            self.batch_size.observe(rows)
            self.batch_adapters.observe(adapters)
            for wait in waits:
                self.queue_wait.observe(wait)

    def set_gauge(self, name: str, help_text: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = (help_text, value)

    def render(self) -> str:
        """The whole exposition, ending with a newline."""
        with self._lock:
            lines: list[str] = []
            for instrument in (self.requests, self.prompt_tokens, self.completion_tokens):
                lines += instrument.render()
            for histogram in (self.latency, self.queue_wait, self.batch_size, self.batch_adapters):
                lines += histogram.render()
            for name, (help_text, value) in sorted(self.gauges.items()):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(value)}"]
        if self._pool_stats is not None:
            for stat, value in sorted(self._pool_stats().items()):
                name = f"adapterhub_pool_{stat}"
                kind = "counter" if stat.endswith("_total") else "gauge"
                lines += [f"# HELP {name} Adapter pool: {stat.replace('_', ' ')}.", f"# TYPE {name} {kind}",
                          f"{name} {_number(float(value))}"]
        if self._usage_report is not None:
            lines += render_usage(self._usage_report())
        return "\n".join(lines) + "\n"


USAGE_SERIES = (
    ("rows", "Rows (requests) served with the adapter."),
    ("prompt_tokens", "Prompt tokens served with the adapter."),
    ("completion_tokens", "Tokens generated with the adapter."),
    ("loads", "Loads of the adapter from the registry on disk."),
    ("load_seconds", "Total seconds those loads took (read, verify, prepare)."),
    ("last_load_seconds", "Seconds the latest load took."),
    ("merges", "Times merge mode merged the adapter into the weights."),
)
TIERS = ("device", "host", "disk")


def render_usage(report: UsageReport) -> list[str]:
    """Per-adapter series from a bounded report. They are gauges, not counters: the ranking is taken at each
    scrape, so an adapter's counts can move between its own series and ``other`` (their sum only grows)."""
    lines: list[str] = []
    for stat, help_text in USAGE_SERIES:
        name = f"adapterhub_adapter_{stat}"
        lines += [f"# HELP {name} {help_text} Top adapters by traffic, the rest as adapter=\"other\".",
                  f"# TYPE {name} gauge"]
        lines += [f"{name}{_labels((('adapter', e.adapter),))} {_number(float(getattr(e.usage, stat)))}"
                  for e in report.entries]
    name = "adapterhub_adapter_resident"
    lines += [f"# HELP {name} 1 for the tier the adapter is in now (device, host or disk); top adapters only.",
              f"# TYPE {name} gauge"]
    for entry in report.entries:
        if entry.residency in TIERS:
            lines += [f"{name}{_labels((('adapter', entry.adapter), ('tier', tier)))} {int(entry.residency == tier)}"
                      for tier in TIERS]
    name = "adapterhub_adapters"
    lines += [f"# HELP {name} Adapters the server has seen, by the tier they are in now.", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels((('tier', tier),))} {report.residency.get(tier, 0)}" for tier in TIERS]
    return lines
