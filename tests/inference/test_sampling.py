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


def test_batched_draws_follow_each_rows_filtered_distribution() -> None:
    """Many rows, one step: each seed's draw is one sample of its row's distribution after temperature,
    top-k and top-p; empirical frequencies match it and filtered-out or masked tokens are never drawn."""
    from adapterhub_local.inference.sampling import RowSampling

    logits = torch.tensor([2.0, 1.0, 0.5, float("-inf"), 0.0, -1.0, 1.5, -3.0])
    cases = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
             SamplingParams(temperature=1.3, top_p=0.8)]
    draws = 6000
    for params in cases:
        sampler = RowSampling([SamplingParams(**{**params.__dict__, "seed": s}) for s in range(draws)],
                              [[]] * draws, 8, torch.device("cpu"))
        tokens, ok = sampler.choose(logits.expand(draws, 8))
        assert ok.all()
        expected = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
        counts = torch.bincount(tokens, minlength=8).double() / draws
        assert (counts[expected == 0] == 0).all(), params
        assert (counts - expected).abs().max() < 0.025, (params, counts, expected)


def test_rows_sample_the_same_alone_as_in_a_batch_that_changes() -> None:
    """Per-row tensors and counter-based streams: a row's tokens depend on its seed, its logits and how many
    tokens it drew, never on its neighbours, their parameters, or rows joining and leaving."""
    from adapterhub_local.inference.sampling import RowSampling

    vocab, steps = 30, 12
    params = [SamplingParams(temperature=0.9, seed=1, top_k=5), SamplingParams(),
              SamplingParams(temperature=1.2, top_p=0.7, seed=2, repetition_penalty=1.4),
              SamplingParams(temperature=0.5, seed=3), SamplingParams(repetition_penalty=2.0)]
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 8]]
    logits = torch.randn(steps, len(params), vocab, generator=torch.Generator().manual_seed(0))
    alone = []
    for i in range(len(params)):
        sampler = RowSampling(params[i:i + 1], prompts[i:i + 1], vocab, torch.device("cpu"))
        alone.append([int(sampler.choose(logits[t, i:i + 1])[0][0]) for t in range(steps)])
    batch = RowSampling(params[:3], prompts[:3], vocab, torch.device("cpu"))
    rows = [0, 1, 2]
    got: dict[int, list[int]] = {i: [] for i in range(len(params))}
    for t in range(steps):
        if t == 4:  # row 1 leaves, rows 3 and 4 join
            batch.select(torch.tensor([0, 2]))
            batch.extend(RowSampling(params[3:], prompts[3:], vocab, torch.device("cpu")))
            rows = [0, 2, 3, 4]
            for i in (3, 4):  # the joiners' own first steps
                got[i] = []
        index = torch.tensor(rows)
        step_logits = logits[t].index_select(0, index)
        if t >= 4:  # a joiner's k-th draw sees the logits its solo run saw at step k
            step_logits = torch.stack([logits[t - 4, i] if i in (3, 4) else logits[t, i] for i in rows])
        tokens, _ = batch.choose(step_logits)
        for i, token in zip(rows, tokens.tolist(), strict=True):
            got[i].append(token)
    for i in (0, 2):
        assert got[i] == alone[i], i
    assert got[1] == alone[1][:4]
    for i in (3, 4):
        assert got[i] == alone[i][: steps - 4], i


def test_the_batched_penalty_equals_hf_over_a_generation() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    from adapterhub_local.inference.sampling import RowSampling

    vocab, penalty = 12, 1.8
    prompt = [3, 3, 7]
    sampler = RowSampling([SamplingParams(repetition_penalty=penalty)], [prompt], vocab, torch.device("cpu"))
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    ids = list(prompt)
    generator = torch.Generator().manual_seed(4)
    for _ in range(8):
        logits = torch.randn(1, vocab, generator=generator) * 3
        want = int(processor(torch.tensor([ids]), logits.clone()).argmax())
        got = int(sampler.choose(logits)[0][0])
        assert got == want
        ids.append(got)
