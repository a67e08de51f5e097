"""OpenAI-compatible request and response bodies (pydantic), plus this server's own ``/v1/classify``
and admin bodies.

Requests validate every sampling parameter to the ranges the engine's sampler provably handles (the
constants in :mod:`adapterhub_local.inference.types`; a bad value is a 422 naming the field, never a
crash). Fields that OpenAI clients may send but this server does not implement are accepted when they
are at their neutral value (``n=1``, zero penalties) and refused with a 422 otherwise, so nothing is silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterhub_local.inference.types import (
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
)

MAX_STOP_STRINGS = 8


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    """Send a last chunk with the token counts (OpenAI's ``stream_options.include_usage``)."""


class SamplingFields(BaseModel):
    """Sampling parameters shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=1200,
                       description="An adapter reference (name, name@N, name:tag), the base name, or a composition "
                       "of up to 8 LoRA adapters written REF*WEIGHT joined by '+' (e.g. task-a*0.7+style-b@2*0.3), "
                       "served exactly as their stored `cat` combination.")
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float = Field(default=1.0, ge=0.0, le=min(2.0, MAX_TEMPERATURE),
                               description=f"0 = greedy; otherwise at least {MIN_TEMPERATURE:g}.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K, description="0 = off (extension).")
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=min(10.0, MAX_REPETITION_PENALTY),
                                      description="1.0 = off (extension).")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    raw: bool = Field(default=False, description="Extension: skip the adapter's own prompt template, stop strings "
                      "and completion prefix (its task spec) and run the prompt as sent.")
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    echo: bool = False
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        if self.n != 1:
            raise ValueError("only n=1 is supported; send several requests instead")
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            raise ValueError("presence_penalty and frequency_penalty are not supported; use repetition_penalty")
        unsupported = [name for name, value in (("logprobs", self.logprobs), ("echo", self.echo),
                                                ("best_of", self.best_of not in (None, 1)),
                                                ("logit_bias", self.logit_bias))
                       if value not in (None, False, 0, {})]
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)}; leave them out")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt (a string, or a one-element list of strings)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send exactly one prompt per request (batching happens on the server)")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: label one text or several with a classifier adapter."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[str]
    raw: bool = Field(default=False, description="Skip the classifier's own input template (its task spec).")

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must hold at least one text")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class AdapterAction(BaseModel):
    """Admin body naming one adapter reference."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1)


class ModeAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["merge", "swap", "auto"]


# ----------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    """One entry of ``/v1/models``: the base (no parent) or an adapter version (parent = its base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapterhub"
    root: str
    parent: str | None = None
    kind: str | None = None
    task_type: str | None = None
    loaded: bool = False
    task: dict[str, Any] | None = None
    """The adapter's task spec (template, completion prefix, stops, labels) that requests get unless raw."""
    parity: dict[str, Any] | None = None
    """The latest ``adapterhub check`` of this version (engine vs PEFT), or None if never checked."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassifyResult(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    created: int
    model: str
    data: list[ClassifyResult]
    usage: dict[str, Any]
