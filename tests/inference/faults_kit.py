"""Fault injection for engine tests: make a pool's copy of an adapter hold NaN, as a fault after load would."""

from __future__ import annotations

from adapterhub_local.inference.adapters import PreparedAdapter
from adapterhub_local.inference.engine import Engine


def poison(engine: Engine, ref: str) -> None:
    """Make the pool's copy of ``ref`` hold NaN (bypassing the load-time refusal, as a fault would)."""
    load = engine.pool.loader

    def loader(name: str) -> PreparedAdapter:
        adapter = load(name)
        if name == ref:
            next(iter(adapter.pairs.values())).b.fill_(float("nan"))
        return adapter

    engine.pool.loader = loader
