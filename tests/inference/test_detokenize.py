"""Incremental detokenisation: a row's streamed text, final text and stop-string cut equal those of decoding
the whole completion at every step (the former O(n²) way), on a byte-level tokenizer whose multi-byte
characters split across tokens, with stops that span tokens; and a step decodes a bounded window."""

from __future__ import annotations

import random
from typing import Any

import pytest

from adapterhub_local.inference.generation import RowState, _holdback, advance
from adapterhub_local.inference.types import SamplingParams

TEXTS = ["the café in Zürich — naïve résumé ✓ 日本語 😀 the end", "ab ab abc", "ßß€€ stop here 😀😀"]


def byte_tokenizer() -> Any:
    """Byte-level BPE (GPT-2 style): every byte a token plus a few merges, so 'é', '—', '日', '😀' span 2–4
    tokens and merged tokens span several characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "s"), ("Ġs", "t"), ("a", "b")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", clean_up_tokenization_spaces=False)


def reference(state: RowState, token: int, tokenizer: Any, eos: set[int]) -> str:
    """The former rule: decode the whole completion at every step."""
    if state.params.stop_at_eos and token in eos:
        state.finish_reason = "stop"
    else:
        state.generated.append(token)
        text = tokenizer.decode(state.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((i for i in (text.find(s) for s in state.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, state.finish_reason = text[:cut], "stop"
        elif len(state.generated) >= state.limit:
            state.finish_reason = "length"
        state.text = text
    visible = len(state.text)
    if not state.finished:
        visible -= _holdback(state.text, state.params.stop)
        while visible > state.emitted and state.text[visible - 1] == "\ufffd":
            visible -= 1
    delta = state.text[state.emitted:visible] if visible > state.emitted else ""
    state.emitted = max(state.emitted, visible)
    return delta


def run(step: Any, ids: list[int], params: SamplingParams, tokenizer: Any, eos: set[int]) -> tuple[list[str], RowState]:
    state = RowState(params=params, prompt_ids=[1], limit=params.max_new_tokens)
    deltas = []
    for token in ids:
        deltas.append(step(state, token, tokenizer, eos))
        if state.finished:
            break
    return deltas, state


@pytest.mark.parametrize("seed", range(6))
def test_incremental_text_equals_decoding_everything_each_step(seed: int) -> None:
    tokenizer = byte_tokenizer()
    eos = {tokenizer.eos_token_id}
    rng = random.Random(seed)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        if seed % 2:  # a cut mid-character, and a stray continuation byte: replacement characters
            ids = ids[:-1] + ids[3:5] + [tokenizer.convert_tokens_to_ids("¨")] + ids
        if seed == 4:
            ids = [*ids[:7], tokenizer.eos_token_id, *ids]
        stops = rng.sample(["the", "é in", "— n", "ab abc", "😀", "日本", "€ s", "zz", "h"], k=rng.randint(0, 3))
        for limit in (len(ids) + 5, rng.randint(1, len(ids))):
            params = SamplingParams(max_new_tokens=limit, stop=stops)
            got, state = run(advance, ids, params, tokenizer, eos)
            want, expected = run(reference, ids, params, tokenizer, eos)
            assert state.text == expected.text and state.finish_reason == expected.finish_reason, (text, stops)
            assert "".join(got) == "".join(want) == state.text
            assert len(got) == len(want)  # the same steps; a held-back tail may show a step later, never lost


def test_a_step_decodes_a_bounded_window() -> None:
    """Each step decodes a few tokens, not the whole completion (what made long rows O(n²))."""
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("the café — 日本語 😀 " * 40)
    longest = 0

    class Counting:
        def decode(self, window: list[int], **kwargs: Any) -> str:
            nonlocal longest
            longest = max(longest, len(window))
            return str(tokenizer.decode(window, **kwargs))

    _, state = run(advance, ids, SamplingParams(max_new_tokens=len(ids)), Counting(), set())
    assert state.text == tokenizer.decode(ids) and len(ids) > 400
    assert longest <= 8
