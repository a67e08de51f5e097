"""An adapter is served the way it was trained: its card's task spec (template, completion prefix, stops)
applies to completions, chat and classify unless the request says ``"raw": true``; ``/v1/models`` shows it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.task_spec import SPEC_KEY, TaskSpec
from tests.peft_factory import save_lora
from tests.server.assets import build_registry
from tests.server.conftest import API_KEY, make_app

SPEC = TaskSpec("generation", "Q: {q}\nA:", completion_prefix="x", stop=("\n", "Q:"))
TWO_FIELDS = TaskSpec("generation", "name={name} food={food} ->", stop=("\n",))
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def templated_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = Path(tmp_path_factory.mktemp("templated"))
    registry = build_registry(root, adapters=1, extras=False)
    base_dir = registry.base("tiny").path
    for name, spec in (("qa", SPEC), ("mr", TWO_FIELDS)):
        save_lora(base_dir, root / name, rank=4, targets=("q_proj", "v_proj"), seed=3, alpha=8)
        registry.register_adapter(name, root / name, "tiny", CardInfo(task="qa", task_type="causal_lm",
                                                                         extra={SPEC_KEY: spec.to_dict()}))
    return registry


@pytest.fixture(scope="module")
def client(templated_registry: Registry) -> Iterator[TestClient]:
    with TestClient(make_app(templated_registry)) as test_client:
        yield test_client


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", headers=HEADERS,
                           json={"model": "qa", "max_tokens": 24, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_fills_template_and_applies_stops(client: TestClient) -> None:
    templated = complete(client, prompt="what is up")
    by_hand = complete(client, prompt="Q: what is up\nA:", stop=list(SPEC.stop), raw=True)
    assert templated["usage"] == by_hand["usage"]  # the same tokens ran
    assert templated["choices"][0]["text"] == SPEC.clean_output(by_hand["choices"][0]["text"])


def test_raw_runs_the_prompt_as_sent(client: TestClient) -> None:
    raw = complete(client, prompt="what is up", raw=True)
    templated = complete(client, prompt="what is up")
    assert raw["usage"]["prompt_tokens"] < templated["usage"]["prompt_tokens"]
    plain = client.post("/v1/completions", headers=HEADERS, json={"model": "tiny", "prompt": "what is up",
                                                                   "max_tokens": 24, "temperature": 0}).json()
    assert raw["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_completion_prefix_is_stripped_whole_and_streamed(client: TestClient, templated_registry: Registry,
                                                          tmp_path: Path) -> None:
    # Take as the prefix what this adapter really starts its answer with, so stripping must happen.
    raw = complete(client, prompt="Q: hello there\nA:", stop=list(SPEC.stop), raw=True)["choices"][0]["text"]
    assert len(raw) >= 2, "pick another prompt: the tiny model stopped at once"
    spec = TaskSpec("generation", SPEC.template, completion_prefix=raw[:2], stop=SPEC.stop)
    save_lora(templated_registry.base("tiny").path, tmp_path / "qp", rank=4, targets=("q_proj", "v_proj"), seed=3,
              alpha=8)
    templated_registry.register_adapter("qp", tmp_path / "qp", "tiny",
                                        CardInfo(task="qa", task_type="causal_lm", extra={SPEC_KEY: spec.to_dict()}))
    whole = complete(client, model="qp", prompt="hello there")["choices"][0]["text"]
    assert whole == raw[2:]
    pieces: list[str] = []
    with client.stream("POST", "/v1/completions", headers=HEADERS,
                       json={"model": "qp", "prompt": "hello there", "max_tokens": 24, "temperature": 0,
                             "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
    assert "".join(pieces) == whole


def test_chat_fills_the_template_with_the_last_user_turn(client: TestClient) -> None:
    chat = client.post("/v1/chat/completions", headers=HEADERS, json={
        "model": "qa", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "what is up"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == complete(client, prompt="what is up")["choices"][0][
        "text"]


@pytest.mark.parametrize("prompt", ["plain text", '{"name": "Alimentum"}', "[1, 2]"])
def test_input_the_template_cannot_take_is_422(client: TestClient, prompt: str) -> None:
    response = client.post("/v1/completions", headers=HEADERS,
                           json={"model": "mr", "prompt": prompt, "max_tokens": 4})
    assert response.status_code == 422, response.text
    assert "raw" in response.json()["error"]["message"]


def test_two_field_template_takes_a_json_object(client: TestClient) -> None:
    filled = complete(client, model="mr", prompt='{"name": "Alimentum", "food": "Chinese"}')
    by_hand = complete(client, model="mr", prompt="name=Alimentum food=Chinese ->", stop=["\n"], raw=True)
    assert filled["choices"][0]["text"] == by_hand["choices"][0]["text"]


def test_models_show_the_task(client: TestClient) -> None:
    models = {m["id"]: m for m in client.get("/v1/models", headers=HEADERS).json()["data"]}
    assert models["qa"]["task"] == SPEC.to_dict()
    assert models["qa@1"]["task"] == SPEC.to_dict()
    assert models["lora0"]["task"] is None
