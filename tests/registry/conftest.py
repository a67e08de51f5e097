"""Registry test fixtures: a real S3-compatible server (moto's, see ``s3_kit``) shared by a test module, and the
environment that points s3fs at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterhub_local.registry import Registry
from tests.registry import s3_kit
from tests.registry.backends import Backend, open_backend


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3_kit.s3_server() as url:
        yield url


@pytest.fixture
def s3_env(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    env = {**s3_kit.environment(endpoint), "ADAPTERHUB_CACHE": str(tmp_path / "cache")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def s3_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    """A new, empty registry on the module's S3 server (its own bucket), with its local cache under tmp_path."""
    from adapterhub_local.registry.objectstore import ObjectStoreRegistry

    endpoint_url = request.getfixturevalue("s3_env")["AWS_ENDPOINT_URL"]
    return ObjectStoreRegistry(f"s3://{s3_kit.new_bucket(endpoint_url)}/team/registry", cache=tmp_path / "cache-a")


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A new, empty registry on each back end (a local directory; an S3-compatible store), with the means
    to open more clients and to tamper with what is stored."""
    return open_backend(request, tmp_path)
