"""The app in process: every bad-input class gets its own status and leaves the server serving; admin
calls need the key; classify, models, metrics and health answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from adapterhub_local.inference import packed_linear
from adapterhub_local.inference.engine import Engine
from adapterhub_local.registry import Registry
from adapterhub_local.server import ServerConfig, create_app
from adapterhub_local.server.auth import AuthConfig
from tests.server.conftest import API_KEY, make_app

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"model": "lora3", "prompt": "hello", "max_tokens": 4, "temperature": 0}


def _error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type"}
    return str(body["error"]["message"])


def _still_serving(client: TestClient) -> None:
    response = client.post("/v1/completions", json=GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize("model", ["no-such-adapter", "lora3@99", "lora3:prod", "sha256:ffffffffffff", "bad name!"])
def test_unknown_model_is_404_saying_where_names_are(client: TestClient, model: str) -> None:
    for path, body in (("/v1/completions", {**GOOD, "model": model}),
                       ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]})):
        message = _error(client.post(path, json=body), 404)
        assert model in message and "/v1/models" in message
    _still_serving(client)


@pytest.mark.parametrize("change", [
    {"temperature": -0.5}, {"temperature": 7}, {"max_tokens": 0}, {"top_p": 0}, {"top_k": -1}, {"n": 2},
    {"repetition_penalty": 0}, {"stop": [""]}, {"stop": ["a"] * 9}, {"prompt": ["a", "b"]}, {"prompt": None},
    {"presence_penalty": 0.5}, {"model": ""}, {"max_tokens": "many"}, {"logprobs": 3}, {"echo": True},
    {"best_of": 2}, {"logit_bias": {"5": 1.0}},
])
def test_invalid_parameters_are_422(client: TestClient, change: dict[str, Any]) -> None:
    body = {**GOOD, **change}
    _error(client.post("/v1/completions", json={k: v for k, v in body.items() if v is not None}), 422)
    _still_serving(client)


def test_malformed_bodies_are_422(client: TestClient) -> None:
    _error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _error(client.post("/v1/chat/completions", json={"model": "lora1", "messages": []}), 422)
    _error(client.post("/v1/chat/completions", json={"model": "lora1", "messages": [{"role": "robot"}]}), 422)
    _error(client.post("/v1/classify", json={"model": "sentiment", "input": []}), 422)
    _still_serving(client)


def test_prompt_beyond_context_is_413(client: TestClient) -> None:
    context = client.app.state.server.engine.context_length  # type: ignore[attr-defined]
    message = _error(client.post("/v1/completions", json={**GOOD, "prompt": "x" * (context + 5)}), 413)
    assert str(context) in message
    # A prompt that fits, with more new tokens asked for than the room left, is refused too …
    _error(client.post("/v1/completions", json={**GOOD, "prompt": "x" * (context - 10), "max_tokens": 20}), 413)
    # … and a soft prompt's virtual tokens count.
    _error(client.post("/v1/completions", json={**GOOD, "model": "soft", "prompt": "x" * (context - 2)}), 413)
    long_chat = {"model": "lora1", "messages": [{"role": "user", "content": "y" * context}]}
    _error(client.post("/v1/chat/completions", json=long_chat), 413)
    _error(client.post("/v1/classify", json={"model": "sentiment", "input": ["ok", "z" * (context + 1)]}), 413)
    _still_serving(client)


def test_adapter_of_another_base_is_409(client: TestClient) -> None:
    message = _error(client.post("/v1/completions", json={**GOOD, "model": "foreign0"}), 409)
    assert "other" in message
    _error(client.post("/admin/adapters/load", json={"adapter": "foreign0"}, headers=ADMIN), 409)
    _still_serving(client)


def test_wrong_kind_of_adapter_is_400(client: TestClient) -> None:
    _error(client.post("/v1/completions", json={**GOOD, "model": "sentiment"}), 400)
    _error(client.post("/v1/classify", json={"model": "lora2", "input": "fine"}), 400)
    _error(client.post("/v1/classify", json={"model": "tiny", "input": "fine"}), 400)
    _still_serving(client)


ADMIN_CALLS = [("get", "/admin/adapters", None), ("post", "/admin/adapters/load", {"adapter": "lora1"}),
               ("post", "/admin/adapters/unload", {"adapter": "lora1"}), ("post", "/admin/adapters/pin",
                                                                          {"adapter": "lora1"}),
               ("post", "/admin/adapters/unpin", {"adapter": "lora1"}), ("get", "/admin/mode", None),
               ("post", "/admin/mode", {"mode": "merge"}), ("post", "/admin/registry/reload", None)]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_admin_refused_without_the_right_key(client: TestClient, method: str, path: str,
                                             body: dict[str, str] | None) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": "Basic x"}):
        response = client.request(method, path, json=body, headers=headers)
        _error(response, 401)
        assert response.headers.get("www-authenticate") == "Bearer"
    assert client.get("/admin/mode").status_code == 401
    assert client.get("/admin/mode", headers={"X-API-Key": API_KEY}).json() == {"mode": "swap"}


def test_admin_disabled_when_the_server_has_no_key(served_registry: Registry) -> None:
    with TestClient(make_app(served_registry, ServerConfig())) as client:
        assert "--api-key" in _error(client.get("/admin/mode", headers=ADMIN), 401)
        _still_serving(client)


def test_protected_public_endpoints_need_the_key(served_registry: Registry) -> None:
    config = ServerConfig(auth=AuthConfig(api_key=API_KEY, protect_public=True))
    with TestClient(make_app(served_registry, config)) as client:
        for path, body in (("/v1/completions", GOOD), ("/v1/classify", {"model": "sentiment", "input": "x"})):
            _error(client.post(path, json=body), 401)
            _error(client.post(path, json=body, headers={"Authorization": "Bearer nope"}), 401)
            assert client.post(path, json=body, headers=ADMIN).status_code == 200
        _error(client.get("/v1/models"), 401)
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_admin_load_pin_unload_mode_reload(client: TestClient) -> None:
    loaded = client.post("/admin/adapters/load", json={"adapter": "lora5"}, headers=ADMIN).json()["loaded"]
    assert loaded["ref"] == "lora5@1" and loaded["tier"] == "device"
    assert client.post("/admin/adapters/pin", json={"adapter": "lora5@1"}, headers=ADMIN).json()["pinned"]["pinned"]
    listing = client.get("/admin/adapters", headers=ADMIN).json()
    assert {"ref": "lora5@1", "pinned": True}.items() <= next(a for a in listing["adapters"]
                                                              if a["ref"] == "lora5@1").items()
    assert listing["pool"]["resident"] >= 1
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["lora5@1"]["loaded"] and models["lora5"]["root"] == "lora5@1"
    client.post("/admin/adapters/unpin", json={"adapter": "lora5"}, headers=ADMIN).raise_for_status()
    client.post("/admin/adapters/unload", json={"adapter": "lora5"}, headers=ADMIN).raise_for_status()
    assert "lora5@1" not in {a["ref"] for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
    _error(client.post("/admin/adapters/load", json={"adapter": "tiny"}, headers=ADMIN), 400)
    _error(client.post("/admin/adapters/load", json={"adapter": "ghost"}, headers=ADMIN), 404)
    _error(client.post("/admin/mode", json={"mode": "fast"}, headers=ADMIN), 422)

    before = client.post("/v1/completions", json=GOOD).json()["choices"][0]["text"]
    assert client.post("/admin/mode", json={"mode": "merge"}, headers=ADMIN).json() == {"mode": "merge",
                                                                                         "previous": "swap"}
    assert client.post("/v1/completions", json=GOOD).json()["choices"][0]["text"] == before
    assert client.post("/admin/registry/reload", headers=ADMIN).json()["adapter_versions"] >= 19
    _still_serving(client)


def test_models_list_base_and_its_adapters_only(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["tiny"]["parent"] is None
    for i in range(16):
        assert by_id[f"lora{i}"]["parent"] == "tiny" and by_id[f"lora{i}@1"]["parent"] == "tiny"
    assert "soft" in by_id and "sentiment" in by_id
    assert not any(m["id"].startswith("foreign") for m in data)


def test_classify_matches_the_engine(client: TestClient) -> None:
    texts = ["a fine film", "dull and long", "ok"]
    body = client.post("/v1/classify", json={"model": "sentiment", "input": texts}).json()
    engine = client.app.state.server.engine  # type: ignore[attr-defined]
    from adapterhub_local.inference.types import Request

    alone = [engine.classify([Request(prompt=t, adapter="sentiment")])[0] for t in texts]
    assert [d["label"] for d in body["data"]] == [r.label for r in alone]
    for got, want in zip(body["data"], alone, strict=True):
        assert set(got["probabilities"]) == {"negative", "positive"}
        assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)


def test_metrics_count_requests_tokens_and_batches(client: TestClient) -> None:
    for _ in range(3):
        client.post("/v1/completions", json=GOOD).raise_for_status()
    client.post("/v1/completions", json={**GOOD, "model": "ghost"})
    text = client.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['adapterhub_requests_total{endpoint="completions",model="lora3@1",status="200"}']) >= 3
    assert float(lines['adapterhub_requests_total{endpoint="completions",model="-",status="404"}']) >= 1
    assert float(lines['adapterhub_completion_tokens_total{model="lora3@1"}']) >= 3
    assert float(lines["adapterhub_batch_size_count"]) >= 3
    assert float(lines['adapterhub_request_latency_seconds_count{endpoint="completions"}']) >= 4
    assert float(lines["adapterhub_pool_misses_total"]) >= 1
    assert "adapterhub_pool_hits_total" in lines and "adapterhub_queued_requests" in lines


def test_metrics_report_the_prepacked_weight_bytes(served_registry: Registry) -> None:
    """A bf16 CPU engine packs its base linears at load where the probe finds the packed call exact; the gauge
    reports the engine's own figure (an fp32 engine packs nothing)."""
    for dtype in (torch.bfloat16, torch.float32):
        engine = Engine(served_registry, "tiny", mode="swap", dtype=dtype)
        with TestClient(create_app(engine, served_registry, "tiny",
                                   ServerConfig(auth=AuthConfig(api_key=API_KEY)))) as test_client:
            text = test_client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        gauge = next(line for line in text.splitlines() if line.startswith("adapterhub_packed_weight_bytes "))
        assert float(gauge.split()[1]) == engine.packed_weight_bytes
        if dtype == torch.float32 or packed_linear.unavailable_reason() is not None:
            assert engine.packed_weight_bytes == 0
        else:
            assert engine.packed_weight_bytes > 0


def test_tags_and_hashes_name_versions(client: TestClient, served_registry: Registry) -> None:
    card = served_registry.tag("lora9@1", "canary")
    digest = card.files["adapter_model.safetensors"][:16]
    answers = set()
    for model in ("lora9", "lora9@1", "lora9:canary", f"sha256:{digest}"):
        response = client.post("/v1/completions", json={**GOOD, "model": model})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        answers.add(response.json()["choices"][0]["text"])
    assert len(answers) == 1
