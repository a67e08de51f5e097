"""HTTP status for every error the server can meet, in OpenAI's error body shape.

The project's error family (problem + fix) maps to statuses by class; the server adds its own few
(prompt too long, bad key, timeout, overload). Anything else is a bug: it becomes a 500 with a request id,
is logged with its traceback, and never takes the server down.

=========================================  ======
unknown model / adapter                     404
invalid parameters (pydantic, bad refs)     422
prompt beyond the context length            413
adapter made for another base               409
missing or wrong API key                    401
wrong kind of adapter for the endpoint      400
request body over the server's limit        413
server overloaded or shutting down          503
request timed out                           504
one row failed alone (non-finite logits)    500
client went away before its answer          499 (logged and counted; nobody reads it)
=========================================  ======
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub_local.errors import (
    AdapterHubError,
    AlreadyExistsError,
    ConfigError,
    FingerprintMismatchError,
    InvalidNameError,
    InvalidReferenceError,
    NotFoundError,
    ShapeMismatchError,
    UnsupportedError,
)
from adapterhub_local.inference.types import RowFailedError

log = logging.getLogger("adapterhub.server")

MODELS_HINT = "list the names this server answers to with GET /v1/models (or `adapterhub list`)"


class PromptTooLongError(AdapterHubError):
    """The prompt plus the requested new tokens do not fit the base's context."""


class AuthError(AdapterHubError):
    """A missing or wrong API key."""


class RequestTimeoutError(AdapterHubError):
    """A request that did not finish within the server's per-request timeout."""


class OverloadedError(AdapterHubError):
    """The queue is full or the server is shutting down."""


class BodyTooLargeError(AdapterHubError):
    """A request body over the server's size limit (refused before it is parsed)."""


class ClientDisconnectedError(AdapterHubError):
    """The client closed the connection before its answer was ready (its work was cancelled)."""


class UnknownModelError(NotFoundError):
    """``model`` names neither the base nor a registered adapter."""


# Most specific first: the first matching class wins.
_STATUS: tuple[tuple[type[AdapterHubError], int, str], ...] = (
    (AuthError, 401, "authentication_error"),
    (PromptTooLongError, 413, "context_length_exceeded"),
    (BodyTooLargeError, 413, "request_too_large"),
    (ClientDisconnectedError, 499, "client_closed_request"),
    (RowFailedError, 500, "server_error"),
    (RequestTimeoutError, 504, "timeout"),
    (OverloadedError, 503, "overloaded"),
    (FingerprintMismatchError, 409, "adapter_base_mismatch"),
    (ShapeMismatchError, 409, "adapter_base_mismatch"),
    (AlreadyExistsError, 409, "conflict"),
    (NotFoundError, 404, "model_not_found"),
    (InvalidNameError, 404, "model_not_found"),
    (InvalidReferenceError, 422, "invalid_request_error"),
    (ConfigError, 422, "invalid_request_error"),
    (UnsupportedError, 400, "invalid_request_error"),
)


def status_of(error: AdapterHubError) -> tuple[int, str]:
    """HTTP status and OpenAI error ``type`` for an error of the project's family."""
    for cls, status, kind in _STATUS:
        if isinstance(error, cls):
            return status, kind
    return 500, "server_error"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}


def error_response(error: AdapterHubError) -> JSONResponse:
    status, kind = status_of(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(str(error), kind), status_code=status, headers=headers)


def unknown_model(name: str, cause: AdapterHubError) -> UnknownModelError:
    """The 404 for ``model``: says what was asked, why it failed, and how to find valid names."""
    return UnknownModelError(f"model {name!r} is not served here ({cause.problem})", MODELS_HINT)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for item in exc.errors():
        loc = [str(x) for x in item.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) + " — fix the listed parameters", param


def install_handlers(app: FastAPI) -> None:
    """Register the exception handlers that turn every error into a JSON body with the right status."""

    @app.exception_handler(AdapterHubError)
    async def _family(request: Request, exc: AdapterHubError) -> JSONResponse:
        status, _ = status_of(exc)
        log.log(logging.ERROR if status >= 500 else logging.INFO, "request refused",
                extra={"fields": {"path": request.url.path, "status": status, "error": str(exc)}})
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        log.info("invalid request", extra={"fields": {"path": request.url.path, "status": 422, "error": message}})
        return JSONResponse(error_body(message, "invalid_request_error", param=param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", extra={"fields": {"path": request.url.path, "status": 500}})
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log", "server_error"),
                            status_code=500)
