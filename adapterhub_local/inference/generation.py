"""The decode loop: prefill a padded batch once, then one token per row per step with a KV cache.

Rows end on EOS, on a stop string (the text is cut before it), at ``max_new_tokens`` / the context length,
or with an error of their own (non-finite logits: see :mod:`sampling`); finished rows ride along until the
whole batch is done (their tokens are ignored). Each step yields the rows' new text, holding back a tail
that could still grow into a stop string, so a stream never shows text that the final answer drops.

Text is detokenised incrementally, as vLLM and Hugging Face's ``TextStreamer`` do: each row keeps two
offsets into its tokens, and a step decodes only the window since the last complete character (a few
tokens), never the whole completion (which made a row's decoding O(n²)). A window whose text ends in an
unfinished UTF-8 sequence (U+FFFD) waits for the next token; a row that ends there keeps the replacement
character, as a full decode would. Stop strings are searched only where a new match can start.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterhub_local.inference.growing_cache import growing_cache
from adapterhub_local.inference.sampling import RowSampling
from adapterhub_local.inference.soft_prompt import Batch
from adapterhub_local.inference.types import FinishReason, SamplingParams


@dataclass
class RowState:
    """One row's progress."""

    params: SamplingParams
    prompt_ids: list[int]
    limit: int
    """How many tokens this row may generate (max_new_tokens, bounded by the context)."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    """Characters of ``text`` already streamed."""
    prefix_offset: int = 0
    """Incremental detokenisation: ``generated[prefix_offset:read_offset]`` is the context window whose text
    is already in ``text``; tokens from ``read_offset`` on are not (yet) part of it."""
    read_offset: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    """Why this row failed alone (its logits went non-finite); the row is finished, without a result."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def fail(self, reason: str) -> None:
        """End this row with an error (the batch's other rows are unaffected)."""
        if not self.finished:
            self.error = reason


NON_FINITE = ("the model's next-token scores for this request were not finite (NaN or inf), so no token "
              "could be chosen")


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:  # a base without a tokenizer: token ids only
        return ""
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _window(tokenizer: Any, state: RowState, final: bool) -> str:
    """The text the tokens since ``read_offset`` add (moving the offsets), or ``""`` while they end inside a
    multi-byte character (unless ``final``: a row that ends there keeps what a full decode shows)."""
    ids = state.generated
    before = _decode(tokenizer, ids[state.prefix_offset:state.read_offset])
    after = _decode(tokenizer, ids[state.prefix_offset:])
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        state.prefix_offset, state.read_offset = state.read_offset, len(ids)
        return after[len(before):]
    return ""


def advance(state: RowState, token: int, tokenizer: Any, eos: set[int]) -> str:
    """Add a token to a row; returns the new text that may be shown now."""
    stops = state.params.stop
    if state.params.stop_at_eos and token in eos:
        state.finish_reason = "stop"
        state.text += _window(tokenizer, state, final=True)
    else:
        state.generated.append(token)
        last = len(state.generated) >= state.limit
        seen = len(state.text)
        text = state.text + _window(tokenizer, state, final=last)
        start = max(0, seen - max((len(s) for s in stops), default=1) + 1)  # a new match ends in the new text
        cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text, state.finish_reason = text[:cut], "stop"
        elif last:
            state.finish_reason = "length"
        state.text = text
    visible = len(state.text)
    if not state.finished:
        visible -= _holdback(state.text, stops)
    delta = state.text[state.emitted:visible] if visible > state.emitted else ""
    state.emitted = max(state.emitted, visible)
    return delta


def cache_keyword(model: nn.Module) -> str:
    """``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_position(device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` for a multi-token forward: the last position as an index tensor. An int slices the
    hidden states (``[B, 1, d]``, not contiguous), and torch's CPU matmul then broadcasts the LM head to
    ``[B, d, V]`` and copies it (measured: 5.6 s of a 32-row SmolLM2-shaped prefill); an index gathers a
    contiguous ``[B, 1, d]``, which folds into one matmul."""
    return torch.tensor([-1], dtype=torch.long, device=device)


def forward_cached(model: nn.Module, **kwargs: Any) -> Any:
    """A forward that keeps the KV cache and the last position's logits. A prefill (no cache passed) starts a
    :func:`growing_cache` (appends in place, no copy of the cache per step) where the model's config allows."""
    if "cache" not in kwargs and "past_key_values" not in kwargs:
        cache = growing_cache(getattr(model, "config", None))
        if cache is not None:
            kwargs[cache_keyword(model)] = cache
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    keep: int | torch.Tensor = 1
    if ids is not None and ids.shape[1] > 1:
        keep = last_position(ids.device)
    return model(use_cache=True, logits_to_keep=keep, **kwargs)


def cache_of(out: Any) -> Any:
    return out.cache if hasattr(out, "cache") else out.past_key_values


class Sampler:
    """Turns each step's last-position logits into tokens and the rows' new text (shared by every decoder)."""

    def __init__(self, states: list[RowState], tokenizer: Any, eos: set[int], device: torch.device) -> None:
        self.states = states
        self.tokenizer = tokenizer
        self.eos = eos
        self.device = device
        self.sampling: RowSampling | None = None  # built at the first step (the vocabulary is the logits')

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.states)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, str, int | None]]]:
        """``logits``: ``[B, V]`` for the batch's rows. Returns the chosen tokens (on the device; a failed
        row's is a harmless placeholder) and, for each live row, ``(row, new text, new token or None)``; a
        row that failed this step is reported once, finished, with its ``error`` set."""
        states = self.states
        if self.sampling is None:
            self.sampling = RowSampling([s.params for s in states], [s.prompt_ids for s in states],
                                        int(logits.shape[-1]), self.device)
        tokens, ok = self.sampling.choose(logits)
        step: list[tuple[int, str, int | None]] = []
        chosen, fine = torch.stack([tokens, ok.long()]).tolist()  # the one host sync per step
        for i, (token, good) in enumerate(zip(chosen, fine, strict=True)):
            state = states[i]
            if state.finished:
                continue
            if not good:
                state.fail(NON_FINITE)
                step.append((i, "", None))
                continue
            before = len(state.generated)
            delta = advance(state, int(token), self.tokenizer, self.eos)
            step.append((i, delta, int(token) if len(state.generated) > before else None))
        return tokens, step


@torch.inference_mode()
def decode(model: nn.Module, batch: Batch, states: list[RowState], tokenizer: Any,
           eos: set[int]) -> Generator[list[tuple[int, str, int | None]], None, None]:
    """Run the batch to completion; each step yields ``(row, new text, new token or None)`` for live rows."""
    cache_kw = cache_keyword(model)
    sampler = Sampler(states, tokenizer, eos, batch.input_ids.device)
    width = int(batch.attention_mask.shape[1])
    # the mask for every step, allocated once: step t attends to the first width + t + 1 columns (a view)
    mask = batch.attention_mask.new_ones((batch.rows, width + max(s.limit for s in states)))
    mask[:, :width] = batch.attention_mask
    position = batch.attention_mask.sum(-1, keepdim=True) - 1  # advanced in place: each row's real tokens
    inputs = {"input_ids": batch.input_ids} if batch.inputs_embeds is None else {"inputs_embeds": batch.inputs_embeds}
    out = forward_cached(model, attention_mask=batch.attention_mask, position_ids=batch.position_ids, **inputs)
    for t in range(1, mask.shape[1] - width + 1):
        tokens, step = sampler.step(out.logits[:, -1])
        yield step
        if sampler.done:
            return
        position.add_(1)
        out = forward_cached(model, input_ids=tokens[:, None], attention_mask=mask[:, :width + t],
                             position_ids=position, **{cache_kw: cache_of(out)})
    raise AssertionError("a row outlived its token limit")  # every row finishes by its limit
