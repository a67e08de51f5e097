"""Request bodies: every out-of-range or unsupported parameter is refused, neutral values pass, and the
response models serialize what the ``openai`` client parses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from adapterhub_local.server.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)

BASE = {"model": "m", "prompt": "p"}


@pytest.mark.parametrize("change", [
    {"temperature": -0.01}, {"temperature": 2.01}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0},
    {"top_k": -1}, {"n": 3}, {"frequency_penalty": 1.0}, {"stop": ""}, {"stop": [f"s{i}" for i in range(9)]},
    {"repetition_penalty": 0.0}, {"prompt": []}, {"prompt": ["a", "b"]}, {"model": ""},
])
def test_out_of_range_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({**BASE, **change})


def test_neutral_and_unknown_fields_pass() -> None:
    body = CompletionRequest.model_validate({**BASE, "n": 1, "presence_penalty": 0, "logit_bias": None,
                                             "stop": "x", "prompt": ["only"]})
    assert body.prompt_text == "only" and body.stop_list == ["x"] and body.temperature == 1.0


def test_chat_limits_and_content_parts() -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "max_completion_tokens": 5, "max_tokens": 9,
                                                 "messages": [{"role": "user", "content": [
                                                     {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert body.token_limit == 5 and body.messages[0].text == "ab"
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                                                          "content": [{"type": "image_url"}]}]})


def test_classify_input_forms() -> None:
    assert ClassifyRequest.model_validate({"model": "c", "input": "one"}).texts == ["one"]
    assert ClassifyRequest.model_validate({"model": "c", "input": ["a", "b"]}).texts == ["a", "b"]
    with pytest.raises(ValidationError):
        ClassifyRequest.model_validate({"model": "c", "input": "x", "temperature": 1})


def test_response_parses_with_the_openai_types() -> None:
    from openai.types import Completion

    body = CompletionResponse(id="c1", created=1, model="m", usage=Usage(prompt_tokens=1, completion_tokens=2,
                                                                          total_tokens=3),
                              choices=[CompletionChoice(text="hi", finish_reason="length")])
    parsed = Completion.model_validate(body.model_dump())
    assert parsed.choices[0].text == "hi" and parsed.usage is not None and parsed.usage.total_tokens == 3
