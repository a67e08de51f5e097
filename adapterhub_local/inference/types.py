"""The engine's public request and result types (stable API for the CLI and the HTTP server).

A :class:`Request` names a prompt (text, chat messages or token ids), an adapter reference (``None`` = the
bare base) and :class:`SamplingParams`. ``Engine.generate`` returns one :class:`GenerationResult` per
request, ``Engine.generate_stream`` yields :class:`StreamEvent` s, ``Engine.classify`` returns
:class:`ClassificationResult` s, ``Engine.logits`` returns :class:`LogitsResult` s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from adapterhub_local.errors import AdapterHubError

# Ranges the sampler provably handles (see :mod:`adapterhub_local.inference.sampling`); the HTTP schema uses them.
MIN_TEMPERATURE = 1e-3
"""Smallest non-zero temperature (smaller ones round to 0 in fp32 and divide by zero; use 0 for greedy)."""
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63 - 1
"""Seeds are 0 … 2**63 - 1 (what ``torch.Generator.manual_seed`` takes on every device)."""
MAX_STOP_CHARS = 256
"""Longest stop string (the hold-back check is linear in it per token)."""


class RowFailedError(AdapterHubError):
    """One row of a batch could not go on (e.g. its logits became non-finite); the other rows are unaffected."""


FinishReason = Literal["stop", "length"]
"""``stop``: EOS or a stop string was produced; ``length``: ``max_new_tokens`` (or the context) ran out."""


@dataclass
class SamplingParams:
    """How to pick tokens. The defaults are greedy decoding of up to 64 new tokens."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (the base's context length also bounds it)."""
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 = sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or output (1.0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends when one appears; the returned text ends before it."""
    seed: int | None = None
    """Per-request seed: the same request with the same seed samples the same tokens in any batch."""
    stop_at_eos: bool = True
    """End at the tokenizer's EOS token."""

    def problems(self) -> list[str]:
        """Every invalid field, described (empty when valid)."""
        out: list[str] = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not _is_real(self.temperature) or not (
                self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            out.append(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
                       f"(got {self.temperature!r})")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            out.append(f"top_k must be an integer in [0, {MAX_TOP_K}] (got {self.top_k!r})")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not _is_real(self.repetition_penalty) or not (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            out.append(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                       f"(got {self.repetition_penalty!r})")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            out.append(f"seed must be an integer in [0, {MAX_SEED}] (got {self.seed!r})")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) for s in self.stop):
            out.append("stop must be a list of strings")
        elif any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            out.append(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Request:
    """One row of a batch: what to run and with which adapter.

    Exactly one of ``prompt`` (text; or a list of token ids, used as given) and ``messages`` (chat
    messages ``[{"role": ..., "content": ...}]``, formatted with the base's chat template) is set.
    """

    prompt: str | list[int] | None = None
    adapter: str | None = None
    """Registry reference (``name``, ``name@3``, ``name:prod``, ``sha256:…``) or ``None`` for the base."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, str]] | None = None
    chat: bool = False
    """Format a text ``prompt`` as one user message with the chat template (if the base has one)."""


@dataclass
class GenerationResult:
    """The outcome of one generation request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    """Tokens of the prompt as run (without an adapter's virtual tokens)."""
    completion_tokens: int
    finish_reason: FinishReason
    adapter: str | None
    """The resolved adapter reference (``name@version``) or ``None``."""


@dataclass
class StreamEvent:
    """One increment of a streamed generation: new text for request ``index`` of the batch.

    The last event of a request has ``finished`` set with its ``result`` — or, when that row failed alone
    (the rest of the batch carries on), with ``error`` and no result.
    """

    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    result: GenerationResult | None = None
    error: RowFailedError | None = None


@dataclass
class ClassificationResult:
    """A classifier adapter's answer: the top label and every label's probability (head order)."""

    label: str
    probabilities: dict[str, float]
    logits: list[float]
    adapter: str | None


@dataclass
class LogitsResult:
    """Next-token logits at every prompt position (``[prompt_tokens, vocab]``, fp32, on CPU).

    Virtual tokens of a soft prompt and padding are not included.
    """

    logits: torch.Tensor
    adapter: str | None


@dataclass
class PoolStats:
    """Adapter-pool counters, for metrics."""

    hits: int = 0
    """Requests for an adapter already resident on the device."""
    host_hits: int = 0
    """Loads served from the CPU cache (no disk read)."""
    misses: int = 0
    """Loads from the registry on disk."""
    evictions: int = 0
    resident: int = 0
    resident_bytes: int = 0
    """What the resident adapters take with rank padding (what ``capacity_bytes`` bounds)."""
    capacity_bytes: int = 0
    stack_bytes: int = 0
    """Bytes the multi-adapter stacks hold now: ``resident_bytes`` plus free slots kept for reuse."""
    host_resident: int = 0
    host_bytes: int = 0


@dataclass
class AdapterInfo:
    """An adapter as the engine sees it."""

    ref: str
    kind: str  # "lora" | "prompt"
    task_type: str | None
    rank: int | None
    bytes: int
    pinned: bool
    tier: str  # "device" | "host" | "disk"
    labels: list[str] | None = None
