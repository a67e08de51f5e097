"""API keys: admin endpoints always need one; public endpoints need it only when asked to.

A key is sent as ``Authorization: Bearer <key>`` (what the ``openai`` client sends) or ``X-API-Key``.
Keys are compared in constant time. A server started without a key refuses every admin call: there is
no way to reach admin endpoints unauthenticated.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request

from adapterhub_local.server.errors import AuthError


@dataclass(frozen=True)
class AuthConfig:
    """Who may call what."""

    api_key: str | None = None
    """The key for admin endpoints (and public ones when ``protect_public``); None disables admin."""
    protect_public: bool = False
    """Require the key on ``/v1/*`` too (``/healthz`` and ``/metrics`` stay open)."""


def presented_key(request: Request) -> str | None:
    """The key a request carries, if any."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    other = request.headers.get("x-api-key")
    return other.strip() if other else None


def _check(config: AuthConfig, request: Request, what: str) -> None:
    if config.api_key is None:
        raise AuthError(f"{what} endpoints are disabled: this server has no API key",
                        "restart it with `adapterhub serve --api-key KEY`")
    key = presented_key(request)
    if key is None:
        raise AuthError(f"{what} endpoints need an API key and none was sent",
                        "send `Authorization: Bearer KEY` or `X-API-Key: KEY`")
    if not secrets.compare_digest(key.encode(), config.api_key.encode()):
        raise AuthError("the API key is wrong", "send the key the server was started with")


def require_admin(config: AuthConfig, request: Request) -> None:
    """Raise :class:`AuthError` unless the request carries the right key."""
    _check(config, request, "admin")


def require_public(config: AuthConfig, request: Request) -> None:
    """Raise :class:`AuthError` when public endpoints are protected and the key is missing or wrong."""
    if config.protect_public:
        _check(config, request, "these")
