"""API keys: admin endpoints always need one; public endpoints need it only when asked to.

A key is sent as ``Authorization: Bearer <key>`` (what the ``openai`` client sends) or ``X-API-Key``.
Keys are compared as given (no trimming or case folding: nothing can turn a header into another key)
and in constant time. A key that could be matched by accident or never matched at all — empty,
whitespace only, with surrounding whitespace (HTTP strips it from headers), or with characters a header
cannot carry — is refused when the server starts. A server started without a key refuses every admin
call: there is no way to reach admin endpoints unauthenticated.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request

from adapterhub_local.errors import ConfigError
from adapterhub_local.server.errors import AuthError


@dataclass(frozen=True)
class AuthConfig:
    """Who may call what."""

    api_key: str | None = None
    """The key for admin endpoints (and public ones when ``protect_public``); None disables admin."""
    protect_public: bool = False
    """Require the key on ``/v1/*`` too (``/healthz`` and ``/metrics`` stay open)."""

    def __post_init__(self) -> None:
        problems = key_problems(self.api_key)
        if self.protect_public and self.api_key is None:
            problems.append("protecting the public endpoints needs an API key")
        if problems:
            raise ConfigError(problems, "start the server with --api-key set to a non-empty key of printable "
                              "ASCII characters without spaces", what="API key")


def key_problems(key: str | None) -> list[str]:
    """What makes ``key`` unusable as an API key (empty when it is fine or ``None``)."""
    if key is None:
        return []
    if not key.strip():
        return ["the API key is empty or whitespace only (it would open the server to anyone sending it)"]
    if key != key.strip():
        return ["the API key starts or ends with whitespace (HTTP strips it from headers, so it never matches)"]
    if not all(" " < c < "\x7f" for c in key):
        return ["the API key holds spaces, control or non-ASCII characters (headers cannot carry them reliably)"]
    return []


def presented_key(request: Request) -> str | None:
    """The key a request carries, if any."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, space, token = header.partition(" ")
        if scheme.lower() == "bearer" and space:
            return token  # as given
    return request.headers.get("x-api-key")


def _check(config: AuthConfig, request: Request, what: str) -> None:
    if config.api_key is None:
        raise AuthError(f"{what} endpoints are disabled: this server has no API key",
                        "restart it with `adapterhub serve --api-key KEY`")
    key = presented_key(request)
    if key is None:
        raise AuthError(f"{what} endpoints need an API key and none was sent",
                        "send `Authorization: Bearer KEY` or `X-API-Key: KEY`")
    if not secrets.compare_digest(key.encode("utf-8", "surrogateescape"), config.api_key.encode()):
        raise AuthError("the API key is wrong", "send the key the server was started with")


def require_admin(config: AuthConfig, request: Request) -> None:
    """Raise :class:`AuthError` unless the request carries the right key."""
    _check(config, request, "admin")


def require_public(config: AuthConfig, request: Request) -> None:
    """Raise :class:`AuthError` when public endpoints are protected and the key is missing or wrong."""
    if config.protect_public:
        _check(config, request, "these")
