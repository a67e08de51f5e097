"""Server fixtures: one registry of tiny assets per session, fresh engines, in-process and live servers
(uvicorn on 127.0.0.1, an OS-chosen port)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from adapterhub_local.inference.engine import Engine
from adapterhub_local.registry import Registry
from adapterhub_local.server import ServerConfig, create_app
from adapterhub_local.server.auth import AuthConfig
from tests.server.assets import build_registry

API_KEY = "test-key-123"
ADAPTERS = 16


@pytest.fixture(scope="session")
def served_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Base ``tiny`` with ``lora0``…``lora15``, ``soft``, ``sentiment``; base ``other`` with ``foreign0``."""
    return build_registry(Path(tmp_path_factory.mktemp("served")), adapters=ADAPTERS)


def make_app(registry: Registry, config: ServerConfig | None = None, mode: str = "swap") -> FastAPI:
    engine = Engine(registry, "tiny", mode=mode)  # type: ignore[arg-type]
    return create_app(engine, registry, "tiny", config or ServerConfig(auth=AuthConfig(api_key=API_KEY)))


@pytest.fixture
def client(served_registry: Registry) -> Iterator[TestClient]:
    """An in-process client (the app's lifespan runs: the scheduler starts and drains)."""
    with TestClient(make_app(served_registry)) as test_client:
        yield test_client


@contextmanager
def live_server(app: FastAPI, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a thread; yields its base URL; stops it gracefully."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def live_url(served_registry: Registry) -> Iterator[str]:
    with live_server(make_app(served_registry)) as url:
        yield url
