"""The real ``openai`` client against a live server on 127.0.0.1: model list, completions, chat,
streaming — and 64 concurrent clients over 16 adapters, each answer equal to the engine's for that
adapter alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from openai import AsyncOpenAI, NotFoundError, OpenAI, UnprocessableEntityError

from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request, SamplingParams
from adapterhub_local.registry import Registry
from tests.server.conftest import ADAPTERS

TOKENS = 8


@pytest.fixture(scope="module")
def reference(served_registry: Registry) -> Engine:
    """A separate engine: what each request gives when run alone."""
    return Engine(served_registry, "tiny", mode="swap")


def alone(engine: Engine, adapter: str | None, prompt: str | None = None,
          messages: list[dict[str, str]] | None = None, tokens: int = TOKENS) -> str:
    request = Request(prompt=prompt, messages=messages, adapter=adapter, sampling=SamplingParams(max_new_tokens=tokens))
    return engine.generate([request])[0].text


@pytest.fixture(scope="module")
def openai_client(live_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_model_list(openai_client: OpenAI) -> None:
    models = {m.id: m for m in openai_client.models.list()}
    assert "tiny" in models
    for i in range(ADAPTERS):
        assert models[f"lora{i}"].model_extra["parent"] == "tiny"  # type: ignore[index]
    assert all(m.object == "model" for m in models.values())
    one = openai_client.models.retrieve("lora3@1")
    assert one.id == "lora3@1" and one.model_extra["parent"] == "tiny"  # type: ignore[index]
    with pytest.raises(NotFoundError):
        openai_client.models.retrieve("ghost")


@pytest.mark.parametrize("model", ["tiny", "lora0", "lora7@1", "soft"])
def test_completion_equals_engine_alone(openai_client: OpenAI, reference: Engine, model: str) -> None:
    out = openai_client.completions.create(model=model, prompt="The cat", max_tokens=TOKENS, temperature=0)
    adapter = None if model == "tiny" else model
    assert out.choices[0].text == alone(reference, adapter, prompt="The cat")
    assert out.model == model and out.object == "text_completion"
    assert out.usage is not None and out.usage.prompt_tokens == len("The cat")
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_chat_template(openai_client: OpenAI, reference: Engine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    out = openai_client.chat.completions.create(model="lora2", messages=messages,  # type: ignore[arg-type]
                                                max_tokens=TOKENS, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == alone(reference, "lora2", messages=messages)
    assert out.usage is not None and out.usage.prompt_tokens == reference.count_tokens(Request(messages=messages))


def test_streaming_gives_the_same_text(openai_client: OpenAI) -> None:
    kwargs = {"model": "lora4", "max_tokens": 12, "temperature": 0}
    whole = openai_client.completions.create(prompt="Once", **kwargs).choices[0].text  # type: ignore[call-overload]
    chunks = list(openai_client.completions.create(prompt="Once", stream=True, **kwargs))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "tell me"}]
    chat_whole = openai_client.chat.completions.create(messages=messages, **kwargs)  # type: ignore[call-overload]
    stream = openai_client.chat.completions.create(messages=messages, stream=True,  # type: ignore[call-overload]
                                                   stream_options={"include_usage": True}, **kwargs)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat_whole.choices[0].message.content
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == chat_whole.usage.completion_tokens


def test_client_sees_typed_errors(openai_client: OpenAI) -> None:
    with pytest.raises(NotFoundError, match="/v1/models"):
        openai_client.completions.create(model="ghost", prompt="x", max_tokens=2)
    with pytest.raises(UnprocessableEntityError):
        openai_client.completions.create(model="lora1", prompt="x", max_tokens=2, temperature=-1)


def test_64_concurrent_clients_over_16_adapters(live_url: str, reference: Engine) -> None:
    jobs = [(f"lora{i % ADAPTERS}", f"prompt {i // ADAPTERS}: " + "abcdefgh"[: 1 + i % 8]) for i in range(64)]

    async def one(client: AsyncOpenAI, model: str, prompt: str) -> str:
        out = await client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
        return out.choices[0].text

    async def run_all() -> list[str]:
        async with AsyncOpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, m, p) for m, p in jobs)), timeout=180)

    answers = asyncio.run(run_all())
    expected = [alone(reference, model, prompt=prompt) for model, prompt in jobs]
    assert answers == expected

    import httpx

    metrics = httpx.get(f"{live_url}/metrics").text
    rows = [line for line in metrics.splitlines() if line.startswith("adapterhub_batch_size_bucket")]
    one_row = next(float(line.split()[-1]) for line in rows if 'le="1"' in line)
    total = next(float(line.split()[-1]) for line in rows if 'le="+Inf"' in line)
    assert total > one_row, "concurrent requests were never batched together"
