"""API keys: bearer or X-API-Key, compared as given in constant time; admin always needs one; public only
when protected; keys that could open the server by accident (or never match) are refused at start-up."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from adapterhub_local.errors import ConfigError
from adapterhub_local.server.auth import AuthConfig, presented_key, require_admin, require_public
from adapterhub_local.server.errors import AuthError


def http(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""})


def test_presented_key_forms() -> None:
    assert presented_key(http({"Authorization": "Bearer k1"})) == "k1"
    assert presented_key(http({"authorization": "bearer  k2 "})) == " k2 "  # as given: no normalisation
    assert presented_key(http({"X-API-Key": "k3"})) == "k3"
    assert presented_key(http({"Authorization": "Basic abc"})) is None
    assert presented_key(http({"Authorization": "Bearer "})) == ""
    assert presented_key(http({})) is None


@pytest.mark.parametrize("key", ["", " ", "\t\n", "  \u3000 ", " secret", "secret ", "sec ret", "sé", "a\x00b"])
def test_unusable_keys_are_refused_at_start_up(key: str) -> None:
    with pytest.raises(ConfigError, match="API key"):
        AuthConfig(api_key=key)


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer  secret"}, {"Authorization": "Bearer secret "},
                                     {"Authorization": "Bearer SECRET"}, {"X-API-Key": " secret"},
                                     {"Authorization": "Bearer "}, {"X-API-Key": ""}])
def test_keys_are_compared_as_given(headers: dict[str, str]) -> None:
    with pytest.raises(AuthError):
        require_admin(AuthConfig(api_key="secret"), http(headers))


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
