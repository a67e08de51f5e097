"""Admin routes (API key always required): load, unload, pin and unpin adapters, list the pool, choose
the serving mode, reload the registry.

Every engine call runs on the scheduler's engine thread between batches, so it never races a batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request

from adapterhub_local.server.auth import require_admin
from adapterhub_local.server.schemas import AdapterAction, ModeAction
from adapterhub_local.server.state import ServerState

log = logging.getLogger("adapterhub.server")


def build_router(state: ServerState) -> APIRouter:
    """The ``/admin`` routes bound to one server's state."""

    def guard(request: Request) -> None:
        require_admin(state.config.auth, request)

    router = APIRouter(prefix="/admin", dependencies=[Depends(guard)])

    def adapter_ref(body: AdapterAction) -> str:
        # Same checks as a generation request: 404 for unknown names, 409 for another base's adapters.
        target = state.resolver.resolve(body.adapter)
        if target.adapter is None:
            from adapterhub_local.errors import UnsupportedError

            raise UnsupportedError(f"{body.adapter!r} is the base model, not an adapter", "name an adapter")
        return target.adapter

    @router.get("/adapters")
    async def adapters() -> dict[str, Any]:
        listing, stats = await state.scheduler.call(lambda: (state.engine.adapters(), state.engine.stats()))
        usage = state.engine.usage_report(state.config.metrics_top_k)
        return {"mode": state.engine.mode, "adapters": [dataclasses.asdict(a) for a in listing],
                "pool": dataclasses.asdict(stats),
                "usage": {"top_k": state.config.metrics_top_k, "residency": usage.residency,
                          "adapters": [e.as_dict() for e in usage.entries]}}

    @router.post("/adapters/load")
    async def load(body: AdapterAction) -> dict[str, Any]:
        ref = adapter_ref(body)
        info = await state.scheduler.call(lambda: state.engine.load(ref))
        log.info("adapter loaded", extra={"fields": {"adapter": ref}})
        return {"loaded": dataclasses.asdict(info)}

    @router.post("/adapters/unload")
    async def unload(body: AdapterAction) -> dict[str, Any]:
        ref = adapter_ref(body)
        await state.scheduler.call(lambda: state.engine.unload(ref))
        log.info("adapter unloaded", extra={"fields": {"adapter": ref}})
        return {"unloaded": ref}

    @router.post("/adapters/pin")
    async def pin(body: AdapterAction) -> dict[str, Any]:
        ref = adapter_ref(body)
        info = await state.scheduler.call(lambda: state.engine.pin(ref))
        log.info("adapter pinned", extra={"fields": {"adapter": ref}})
        return {"pinned": dataclasses.asdict(info)}

    @router.post("/adapters/unpin")
    async def unpin(body: AdapterAction) -> dict[str, Any]:
        ref = adapter_ref(body)
        await state.scheduler.call(lambda: state.engine.unpin(ref))
        log.info("adapter unpinned", extra={"fields": {"adapter": ref}})
        return {"unpinned": ref}

    @router.get("/mode")
    async def get_mode() -> dict[str, str]:
        return {"mode": state.engine.mode}

    @router.post("/mode")
    async def set_mode(body: ModeAction) -> dict[str, str]:
        before = state.engine.mode
        await state.scheduler.call(lambda: state.engine.set_mode(body.mode))
        log.info("mode changed", extra={"fields": {"from": before, "to": body.mode}})
        return {"mode": state.engine.mode, "previous": before}

    @router.post("/registry/reload")
    async def reload_registry() -> dict[str, Any]:
        versions = await state.scheduler.call(state.resolver.reload)
        log.info("registry reloaded", extra={"fields": {"adapter_versions": versions}})
        return {"reloaded": True, "adapter_versions": versions}

    return router
