"""Several servers, one registry (local or on object storage): a version another process publishes is
served by every server after its ``/admin/registry/reload``, and nothing is served stale — a name that
moved to new bytes never answers with the old ones, and a version deleted elsewhere stops being served."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.objectstore import ObjectStoreRegistry
from tests.peft_factory import save_lora
from tests.registry import s3_kit
from tests.server.assets import make_chat_base
from tests.server.conftest import API_KEY, make_app

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
Opener = Callable[[str], Registry]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3_kit.s3_server() as url:
        yield url


@pytest.fixture(params=["local", "s3"])
def opener(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Opener:
    """Opens one more client of a shared registry holding base ``tiny``; the argument names its cache."""
    base_dir = make_chat_base(tmp_path / "base")
    if request.param == "local":
        Registry(tmp_path / "reg").add_base("tiny", str(base_dir))
        return lambda _cache: Registry.open(tmp_path / "reg")
    endpoint = request.getfixturevalue("endpoint")
    for key, value in s3_kit.environment(endpoint).items():
        monkeypatch.setenv(key, value)
    url = f"s3://{s3_kit.new_bucket(endpoint)}/shared"
    ObjectStoreRegistry(url, cache=tmp_path / "setup").add_base("tiny", str(base_dir))
    return lambda cache: ObjectStoreRegistry(url, cache=tmp_path / cache, create=False)


def publish(registry: Registry, work: Path, seed: int) -> str:
    save_lora(registry.base("tiny").path, work / f"lora{seed}", rank=8, alpha=64, seed=seed)
    return registry.register_adapter("qa", work / f"lora{seed}", "tiny", CardInfo(task_type="causal_lm")).ref


def complete(client: TestClient, model: str) -> Any:
    body = {"model": model, "prompt": "hello there", "max_tokens": 8, "temperature": 0, "raw": True}
    return client.post("/v1/completions", json=body, headers=ADMIN)


def text(client: TestClient, model: str) -> str:
    response = complete(client, model)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def roots(client: TestClient) -> dict[str, str]:
    return {m["id"]: m["root"] for m in client.get("/v1/models", headers=ADMIN).json()["data"]}


def test_servers_see_each_others_versions_after_reload_and_serve_nothing_stale(opener: Opener,
                                                                               tmp_path: Path) -> None:
    writer = opener("cache-writer")
    assert publish(writer, tmp_path, seed=1) == "qa@1"
    with TestClient(make_app(opener("cache-a"))) as a, TestClient(make_app(opener("cache-b"))) as b:
        old = text(a, "qa")
        assert text(b, "qa") == old == text(a, "qa@1")  # both servers, one version; qa@1 now in a's pool

        assert publish(writer, tmp_path, seed=2) == "qa@2"  # published by another process
        for server in (a, b):
            reloaded = server.post("/admin/registry/reload", headers=ADMIN).json()
            assert reloaded["adapter_versions"] == 2
        new = text(b, "qa@2")
        assert new != old  # the two versions are told apart by their outputs (else the test proves nothing)
        for server in (a, b):  # the name moved: served with the new bytes, never from the pooled old ones
            assert roots(server)["qa"] == "qa@2"
            assert text(server, "qa") == new
            assert text(server, "qa@1") == old  # an immutable reference keeps its bytes


def test_a_version_deleted_by_another_process_is_not_served_after_reload(opener: Opener, tmp_path: Path) -> None:
    writer = opener("cache-writer")
    publish(writer, tmp_path, seed=1)
    publish(writer, tmp_path, seed=2)
    with TestClient(make_app(opener("cache-a"))) as server:
        assert complete(server, "qa@1").status_code == 200  # resolved and pooled
        writer.delete("qa@1")
        server.post("/admin/registry/reload", headers=ADMIN).raise_for_status()
        assert complete(server, "qa@1").status_code == 404
        assert roots(server)["qa"] == "qa@2" and "qa@1" not in roots(server)
