"""The server's configuration and the objects every route shares."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapterhub_local.inference.usage import DEFAULT_TOP_K
from adapterhub_local.registry import BaseRecord, Registry
from adapterhub_local.server.auth import AuthConfig
from adapterhub_local.server.backend import ServingEngine
from adapterhub_local.server.metrics import ServerMetrics
from adapterhub_local.server.prepare import ModelResolver, PromptBuilder
from adapterhub_local.server.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``adapterhub serve`` decides about the HTTP server."""

    auth: AuthConfig = field(default_factory=AuthConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    completion_max_tokens: int = 16
    """Default ``max_tokens`` for ``/v1/completions`` (OpenAI's default)."""
    chat_max_tokens: int = 256
    """Default ``max_tokens`` for ``/v1/chat/completions`` (clamped to the context left)."""
    max_classify_inputs: int = 256
    """Most texts in one ``/v1/classify`` call."""
    max_body_bytes: int = 2 << 20
    """Largest request body read (413 beyond it, before parsing)."""
    metrics_top_k: int = DEFAULT_TOP_K
    """Adapters named in per-adapter metrics and ``/admin/adapters`` usage (most traffic first); the rest are
    summed as ``other``, so the label set stays bounded."""


class ServerState:
    """Engine, registry, scheduler, metrics — built once per app."""

    def __init__(self, engine: ServingEngine, registry: Registry, base: BaseRecord, config: ServerConfig) -> None:
        self.engine = engine
        self.registry = registry
        self.base = base
        self.config = config
        self.started = int(time.time())
        self.metrics = ServerMetrics(pool_stats=self._pool_stats,
                                     usage_report=lambda: engine.usage_report(config.metrics_top_k))
        self.scheduler = Scheduler(engine, config.scheduler, self.metrics)
        self.resolver = ModelResolver(registry, base)
        self.prompts = PromptBuilder(engine.tokenizer, engine.context_length)
        self.draining = False

    def _pool_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        return {
            "hits_total": stats.hits, "host_hits_total": stats.host_hits, "misses_total": stats.misses,
            "evictions_total": stats.evictions, "resident_adapters": stats.resident,
            "resident_bytes": stats.resident_bytes, "capacity_bytes": stats.capacity_bytes,
            "stack_bytes": stats.stack_bytes,
            "host_adapters": stats.host_resident, "host_bytes": stats.host_bytes,
        }
