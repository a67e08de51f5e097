"""Per-request compositions over HTTP: ``model: "lora0*0.7+lora1*0.3"`` answers exactly as the stored ``cat``
combination, batches with single-adapter, soft-prompt and base requests, and bad compositions get a 4xx naming
the reason."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterhub_local.compose.combine import combine
from adapterhub_local.registry import Registry
from tests.server.assets import build_registry
from tests.server.conftest import make_app

MIX = "lora0*0.7+lora1*-0.3"


@pytest.fixture(scope="module")
def compose_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    registry = build_registry(Path(tmp_path_factory.mktemp("compose")), adapters=3)
    combine(registry, ["lora0", "lora1"], [0.7, -0.3], "mix")
    return registry


@pytest.fixture
def client(compose_registry: Registry) -> Iterator[TestClient]:
    with TestClient(make_app(compose_registry)) as test_client:
        yield test_client


def _complete(client: TestClient, model: str, prompt: str = "hello there", tokens: int = 8) -> dict[str, object]:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                   "temperature": 0})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _text(body: dict[str, object]) -> str:
    choices = body["choices"]
    assert isinstance(choices, list)
    return str(choices[0]["text"])


def test_composed_request_answers_as_the_stored_cat_adapter(client: TestClient) -> None:
    composed = _complete(client, MIX, tokens=12)
    assert composed["model"] == MIX  # echoed as sent
    assert _text(composed) == _text(_complete(client, "mix", tokens=12))
    assert _text(composed) != _text(_complete(client, "lora0", tokens=12))
    chat = client.post("/v1/chat/completions", json={"model": MIX, "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 6, "temperature": 0})
    assert chat.status_code == 200, chat.text


def test_composed_rows_batch_with_single_soft_prompt_and_base_rows(client: TestClient) -> None:
    models = [MIX, "lora2", "soft", "tiny", "lora1*0.5+lora2*1.5", MIX, "mix"]
    prompts = [f"request {i} says hi" for i in range(len(models))]
    solo = [_text(_complete(client, m, p)) for m, p in zip(models, prompts, strict=True)]
    with ThreadPoolExecutor(len(models)) as pool:  # concurrent: the scheduler batches them together
        together = list(pool.map(lambda mp: _text(_complete(client, *mp)), zip(models, prompts, strict=True)))
    assert together == solo


@pytest.mark.parametrize(("model", "status", "reason"), [
    ("lora0*0.7+nope*0.3", 404, "'nope' is not registered"),
    ("lora0*0.7+lora1*nan", 422, "not a plain finite number"),
    ("lora0*0.7+lora1*0", 422, "adds nothing"),
    ("+".join(f"lora0@1*{i + 1}" for i in range(9)), 422, "at most 8"),
    ("lora0*0.7+foreign0*0.3", 409, "not on base 'tiny'"),
    ("lora0*0.7+soft*0.3", 400, "soft prompt"),
    ("lora0*0.7+sentiment*0.3", 400, "classifier head"),
    ("lora0*0.7+lora0@1*0.3", 422, "more than once"),
    ("lora0*0.7+tiny*0.3", 400, "names the base"),
])
def test_bad_compositions_get_4xx_with_the_reason(client: TestClient, model: str, status: int, reason: str) -> None:
    response = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    assert _text(_complete(client, MIX, tokens=2))  # still serving
