"""Isolation through the scheduler and the HTTP app: every request gets its own answer on both scheduler
paths (a mis-delivery is caught); a poisoned row fails alone (dynamic and continuous, swap and auto); sampling
parameters outside the sampler's ranges are 422s naming the field, extreme ones inside them serve; bodies
over the limit and prompts that cannot fit are refused before parsing or tokenizing; only canonical model
names resolve, so metric labels stay bounded by the registry."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import GenerationResult, Request, RowFailedError, SamplingParams
from adapterhub_local.registry import Registry
from adapterhub_local.server import ServerConfig
from adapterhub_local.server.auth import AuthConfig
from adapterhub_local.server.scheduler import Scheduler, SchedulerConfig
from tests.inference.faults_kit import poison
from tests.server.conftest import API_KEY, make_app

T = TypeVar("T")
ADAPTERS: list[str | None] = ["lora0", "lora1", "lora2", "soft", None, "lora3", "lora4", "lora5"]
POISONED = 2  # the row whose adapter holds NaN


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=60))


def requests() -> list[Request]:
    out = []
    for i, adapter in enumerate(ADAPTERS):
        sampled = i % 3 == 0
        out.append(Request(prompt=f"request {i} " + "ab" * i, adapter=adapter, sampling=SamplingParams(
            max_new_tokens=5 + i, stop_at_eos=False, temperature=0.9 if sampled else 0.0,
            seed=40 + i if sampled else None)))
    return out


@pytest.fixture(scope="module")
def solo(served_registry: Registry) -> list[GenerationResult]:
    engine = Engine(served_registry, "tiny", mode="swap")
    results = [engine.generate([r])[0] for r in requests()]
    assert len({tuple(r.token_ids) for r in results}) == len(results), "rows must differ to catch mis-delivery"
    return results



async def one_batch(scheduler: Scheduler, reqs: list[Request]) -> list[GenerationResult | BaseException]:
    """Submit every request while the engine thread is held, so that they meet in one batch."""
    gate = threading.Event()
    held = asyncio.ensure_future(scheduler.call(lambda: gate.wait(30)))
    await asyncio.sleep(0.05)
    jobs = [scheduler.submit(r, str(r.adapter)) for r in reqs]
    gate.set()
    await held
    return await asyncio.gather(*(scheduler.result(j) for j in jobs), return_exceptions=True)


@pytest.mark.parametrize("continuous", [False, True], ids=["dynamic", "continuous"])
def test_every_request_gets_its_own_answer(served_registry: Registry, solo: list[GenerationResult],
                                           continuous: bool) -> None:
    engine = Engine(served_registry, "tiny", mode="swap")

    async def go() -> list[GenerationResult | BaseException]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0, continuous=continuous))
        results = await one_batch(scheduler, requests())
        assert scheduler.batches_run == 1, "the requests must share one batch for this test to mean anything"
        await scheduler.stop()
        return results

    results = run(go)
    for i, (got, expected) in enumerate(zip(results, solo, strict=True)):
        assert isinstance(got, GenerationResult), got
        assert got.token_ids == expected.token_ids, f"request {i} got another request's answer"
    assert engine.open_rows == 0 and not engine.pool.busy


@pytest.mark.parametrize("mode", ["swap", "auto"])
@pytest.mark.parametrize("continuous", [False, True], ids=["dynamic", "continuous"])
def test_a_poisoned_row_fails_alone(served_registry: Registry, solo: list[GenerationResult], mode: str,
                                    continuous: bool) -> None:
    engine = Engine(served_registry, "tiny", mode=mode)  # type: ignore[arg-type]
    poison(engine, f"{ADAPTERS[POISONED]}@1")

    async def go() -> list[GenerationResult | BaseException]:
        scheduler = Scheduler(engine, SchedulerConfig(window_ms=0, continuous=continuous))
        results = await one_batch(scheduler, requests())
        assert scheduler.batches_run == 1
        await scheduler.stop()
        return results

    results = run(go)
    assert isinstance(results[POISONED], RowFailedError), results[POISONED]
    for i, (got, expected) in enumerate(zip(results, solo, strict=True)):
        if i != POISONED:
            assert isinstance(got, GenerationResult), f"request {i} failed with its neighbour: {got!r}"
            assert got.token_ids == expected.token_ids
    assert engine.open_rows == 0 and not engine.pool.busy


# ------------------------------------------------------------------------------------------------ HTTP
GOOD = {"model": "lora3", "prompt": "hello", "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 1e-300), ("temperature", 0.0009), ("temperature", 2.5), ("temperature", -1),
    ("seed", 2**64), ("seed", -1), ("seed", 2**63), ("top_k", 2**40), ("top_k", -3), ("top_p", 0),
    ("top_p", 1.5), ("repetition_penalty", 1e-9), ("repetition_penalty", 0.0), ("repetition_penalty", 1e6),
    ("stop", ["y" * 257]), ("max_tokens", 0),
])
def test_parameters_the_sampler_cannot_handle_are_422_naming_the_field(client: TestClient, field: str,
                                                                       value: object) -> None:
    response = client.post("/v1/completions", json={**GOOD, field: value})
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_numbers_are_422(client: TestClient, field: str, literal: str) -> None:
    body = json.dumps(GOOD)[:-1] + f', "{field}": {literal}}}'
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_extreme_parameters_inside_the_ranges_serve_beside_normal_requests(served_registry: Registry) -> None:
    extremes: list[dict[str, Any]] = [
        {"temperature": 0.001}, {"temperature": 2.0}, {"temperature": 1.0, "top_p": 1e-30},
        {"temperature": 1.0, "top_k": 2**31 - 1}, {"repetition_penalty": 0.01}, {"repetition_penalty": 10.0},
        {"temperature": 1.0, "seed": 2**63 - 1}, {"temperature": 0.001, "top_k": 1, "top_p": 1e-9},
    ]
    with TestClient(make_app(served_registry)) as client:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(len(extremes) + 4) as pool:
            futures = [pool.submit(client.post, "/v1/completions", json={**GOOD, "max_tokens": 6, **e})
                       for e in extremes]
            futures += [pool.submit(client.post, "/v1/completions", json=GOOD) for _ in range(4)]
            for future in futures:
                response = future.result()
                assert response.status_code == 200, response.text


def test_bodies_over_the_limit_are_413_before_parsing(served_registry: Registry) -> None:
    config = ServerConfig(auth=AuthConfig(api_key=API_KEY), max_body_bytes=4000)
    with TestClient(make_app(served_registry, config)) as client:
        big = {**GOOD, "prompt": "x" * 5000}
        response = client.post("/v1/completions", json=big)
        assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as the bytes arrive
            body = json.dumps(big).encode()
            for start in range(0, len(body), 700):
                yield body[start:start + 700]

        response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert client.post("/v1/completions", json=GOOD).status_code == 200
        assert client.get("/healthz").status_code == 200


class Spy:
    """The prompt builder's tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        return self.tokenizer(text, *args, **kwargs)

    def apply_chat_template(self, turns: list[dict[str, str]], **kwargs: Any) -> Any:
        self.lengths.append(sum(len(t["content"]) for t in turns))
        return self.tokenizer.apply_chat_template(turns, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("characters", [10_000, 300_000, 3_000_000])
def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(served_registry: Registry,
                                                                    characters: int) -> None:
    config = ServerConfig(auth=AuthConfig(api_key=API_KEY), max_body_bytes=16 << 20)
    app = make_app(served_registry, config)
    prompts = app.state.server.prompts
    spy = Spy(prompts.tokenizer)
    prompts.tokenizer = spy
    with TestClient(app) as client:
        for path, body in (("/v1/completions", {**GOOD, "prompt": "z" * characters}),
                           ("/v1/chat/completions", {"model": "lora3", "messages": [
                               {"role": "user", "content": "z" * (characters // 2)},
                               {"role": "user", "content": "z" * (characters // 2)}]})):
            response = client.post(path, json=body)
            assert response.status_code == 413, response.text
            assert response.json()["error"]["type"] == "context_length_exceeded"
        assert client.post("/v1/completions", json=GOOD).status_code == 200
    limit = prompts.context_length * prompts.max_token_chars
    assert spy.lengths and max(spy.lengths) < limit, "a prompt that cannot fit was tokenized"


@pytest.mark.parametrize("variant", [" lora3", "lora3 ", "lora3\n", "\tlora3", "lora3@01", "lora3@ 1", "LORA3",
                                     "lora3@1 ", "sha256:ABCDEF12", " sha256:abcdef12", "lora3 :x", "lo ra3"])
def test_only_canonical_names_resolve(client: TestClient, variant: str) -> None:
    response = client.post("/v1/completions", json={**GOOD, "model": variant})
    assert response.status_code == 404, response.text


def test_metric_labels_are_bounded_by_the_registry(client: TestClient, served_registry: Registry) -> None:
    for k in range(40):
        client.post("/v1/completions", json={**GOOD, "model": "lora3" + " " * k})
        client.post("/v1/completions", json={**GOOD, "model": f"junk-{k}"})
    digest = served_registry.resolve("lora3").files["adapter_model.safetensors"][:12]
    for name in ("lora3", "lora3@1", f"sha256:{digest}"):
        assert client.post("/v1/completions", json={**GOOD, "model": name}).status_code == 200
    text = client.get("/metrics").text
    models = {part.split('model="', 1)[1].split('"', 1)[0] for part in text.splitlines()
              if 'model="' in part and not part.startswith("#")}
    allowed = {"-", "tiny"} | {row.ref for row in served_registry.list_adapters()}
    assert models <= allowed, models - allowed
