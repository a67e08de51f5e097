"""Sampling: seeds, top-k, top-p, temperature and repetition penalty, checked against their definitions
and against Hugging Face's logits processors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local.errors import ConfigError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.inference.sampling import check, filter_top_k_top_p, repetition_penalty
from adapterhub_local.registry import Registry


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), penalty=st.floats(0.5, 3.0))
def test_repetition_penalty_matches_hf(seed: int, penalty: float) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(20, generator=generator)
    seen = torch.randint(0, 20, (6,), generator=generator)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
    torch.testing.assert_close(repetition_penalty(logits, seen, penalty), expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), top_k=st.integers(0, 25), top_p=st.floats(0.05, 1.0))
def test_top_k_top_p_match_hf(seed: int, top_k: int, top_p: float) -> None:
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(20, generator=torch.Generator().manual_seed(seed))
    expected = logits[None].clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected[0]))


def test_invalid_parameters_listed_together() -> None:
    with pytest.raises(ConfigError) as info:
        check(SamplingParams(max_new_tokens=0, temperature=-1, top_p=0))
    assert len(info.value.problems) == 3


def test_seeded_sampling_is_reproducible_in_any_batch(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.95, seed=7, stop_at_eos=False)
    alone = engine.generate([Request(prompt="sample", adapter="r2-v", sampling=params)])[0]
    batch = engine.generate([Request(prompt="other", adapter="r64-ko",
                                     sampling=SamplingParams(temperature=0.7, max_new_tokens=5)),
                             Request(prompt="sample", adapter="r2-v", sampling=params)])[1]
    assert alone.token_ids == batch.token_ids
    other_seed = engine.generate([Request(prompt="sample", adapter="r2-v",
                                          sampling=SamplingParams(**{**vars(params), "seed": 8}))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_is_greedy(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    greedy = engine.generate([Request(prompt="k1", sampling=SamplingParams(max_new_tokens=10))])[0]
    sampled = engine.generate([Request(prompt="k1", sampling=SamplingParams(max_new_tokens=10, temperature=2.0,
                                                                            top_k=1, seed=3))])[0]
    assert greedy.token_ids == sampled.token_ids


def test_repetition_penalty_reduces_repeats(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")

    def repeats(penalty: float) -> int:
        ids = engine.generate([Request(prompt="aaaa", sampling=SamplingParams(
            max_new_tokens=24, repetition_penalty=penalty, stop_at_eos=False))])[0].token_ids
        return len(ids) - len(set(ids))

    assert repeats(5.0) < repeats(1.0)
