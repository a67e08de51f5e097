"""The engine's public request and result types (stable API for the CLI and the HTTP server).

A :class:`Request` names a prompt (text, chat messages or token ids), an adapter reference (``None`` = the
bare base) and :class:`SamplingParams`. ``Engine.generate`` returns one :class:`GenerationResult` per
request, ``Engine.generate_stream`` yields :class:`StreamEvent` s, ``Engine.classify`` returns
:class:`ClassificationResult` s, ``Engine.logits`` returns :class:`LogitsResult` s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

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
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            out.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            out.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if any(not s for s in self.stop):
            out.append("stop strings must not be empty")
        return out


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

    The last event of a request has ``finished`` set with its ``result``.
    """

    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    result: GenerationResult | None = None


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
