"""The FastAPI application: ``create_app(engine, registry, base)`` wires routes, error handlers, the
request log and metrics, and the scheduler's lifecycle (started with the app, drained on shutdown).

Request bodies are read in full, up to ``ServerConfig.max_body_bytes``, before any route parses them (413
beyond it, judged from ``Content-Length`` when sent, else as the bytes arrive), so no body can make the
server buffer or parse more than the limit.

Open routes: ``/healthz`` and ``/metrics``. ``/v1/*`` may require the key (``AuthConfig.protect_public``);
``/admin/*`` always does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterhub_local.registry import Registry
from adapterhub_local.server import routes_admin, routes_openai
from adapterhub_local.server.backend import ServingEngine
from adapterhub_local.server.errors import BodyTooLargeError, error_response, install_handlers
from adapterhub_local.server.state import ServerConfig, ServerState

log = logging.getLogger("adapterhub.server")

# Metric label for each route family (bounded label values: never the raw path).
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/classify": "classify",
              "/v1/models": "models"}


def _endpoint(path: str) -> str:
    if path in _ENDPOINTS:
        return _ENDPOINTS[path]
    if path.startswith("/admin/"):
        return "admin"
    return "other"


class RequestLog:
    """Pure ASGI middleware: a request id header, one structured log line and the request metrics per
    request, timed to the last byte sent (so streams count in full). Pure ASGI rather than Starlette's
    ``BaseHTTPMiddleware``, which costs a task group and memory streams per request."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - started
            path = str(scope.get("path", ""))
            model = str((scope.get("state") or {}).get("model", "-"))
            endpoint = _endpoint(path)
            if endpoint != "other":
                self.state.metrics.request_done(endpoint, model, status, seconds)
            log.info("request", extra={"fields": {"id": request_id, "method": scope.get("method"), "path": path,
                                                  "model": model, "status": status,
                                                  "ms": round(seconds * 1000, 2)}})


class BodyLimit:
    """Pure ASGI middleware: read an HTTP request's body, at most ``max_bytes`` of it, before the app sees it;
    413 beyond that. The app then receives the buffered body, and afterwards the connection's own messages
    (so a route can still wait for ``http.disconnect``)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            if buffered:
                return buffered.pop()
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        error = BodyTooLargeError(f"the request body is over {self.max_bytes} bytes (at least {size})",
                                  "send a shorter prompt (the server's limit is --max-body-mb)")
        await error_response(error)(scope, receive, send)


def create_app(engine: ServingEngine, registry: Registry, base: str, config: ServerConfig | None = None) -> FastAPI:
    """The server for ``engine`` (which holds base ``base`` from ``registry``)."""
    state = ServerState(engine, registry, registry.base(base), config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        log.info("server ready", extra={"fields": {"base": base, "mode": engine.mode,
                                                   "context_length": engine.context_length}})
        try:
            yield
        finally:
            state.draining = True
            log.info("draining", extra={"fields": {"queued": state.scheduler.queued}})
            await state.scheduler.stop()
            log.info("stopped", extra={"fields": {"batches": state.scheduler.batches_run}})

    app = FastAPI(title="adapterhub", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over one base model and its registered adapters.")
    app.state.server = state
    install_handlers(app)
    app.include_router(routes_openai.build_router(state))
    app.include_router(routes_admin.build_router(state))

    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)
    app.add_middleware(RequestLog, state=state)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        body = {"status": "draining" if state.draining else "ok", "base": base, "mode": engine.mode,
                "queued": state.scheduler.queued, "batches": state.scheduler.batches_run,
                "uptime_s": int(time.time()) - state.started}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        state.metrics.set_gauge("adapterhub_queued_requests", "Requests waiting for a batch.", state.scheduler.queued)
        state.metrics.set_gauge("adapterhub_open_rows", "Rows held by open decode batches (0 when idle).",
                                int(getattr(engine, "open_rows", 0)))
        state.metrics.set_gauge("adapterhub_packed_weight_bytes", "Base weights held a second time, laid out once "
                                "for the CPU's bf16 matmul (inference/packed_linear.py); 0 where none are.",
                                int(getattr(engine, "packed_weight_bytes", 0)))
        # The engine's counters sit behind its lock, which a running batch holds: read them off the loop.
        text = await asyncio.to_thread(state.metrics.render)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
