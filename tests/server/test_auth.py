"""API keys: bearer or X-API-Key, constant-time compared; admin always needs one; public only when
protected."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from adapterhub_local.server.auth import AuthConfig, presented_key, require_admin, require_public
from adapterhub_local.server.errors import AuthError


def http(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""})


def test_presented_key_forms() -> None:
    assert presented_key(http({"Authorization": "Bearer k1"})) == "k1"
    assert presented_key(http({"authorization": "bearer  k2 "})) == "k2"
    assert presented_key(http({"X-API-Key": "k3"})) == "k3"
    assert presented_key(http({"Authorization": "Basic abc"})) is None
    assert presented_key(http({"Authorization": "Bearer "})) is None
    assert presented_key(http({})) is None


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"X-API-Key": "secret2"},
                                     {"Authorization": "Bearer secre"}])
def test_admin_refuses_missing_or_wrong(headers: dict[str, str]) -> None:
    with pytest.raises(AuthError):
        require_admin(AuthConfig(api_key="secret"), http(headers))


def test_admin_accepts_the_key_and_is_off_without_one() -> None:
    require_admin(AuthConfig(api_key="secret"), http({"Authorization": "Bearer secret"}))
    require_admin(AuthConfig(api_key="secret"), http({"X-API-Key": "secret"}))
    with pytest.raises(AuthError, match="--api-key"):
        require_admin(AuthConfig(), http({"Authorization": "Bearer anything"}))


def test_public_only_when_protected() -> None:
    require_public(AuthConfig(api_key="secret"), http({}))
    with pytest.raises(AuthError):
        require_public(AuthConfig(api_key="secret", protect_public=True), http({}))
    require_public(AuthConfig(api_key="secret", protect_public=True), http({"X-API-Key": "secret"}))
