"""Fault containment in the engine: a row whose logits go non-finite ends alone with an error while the
other rows of its batch get exactly their solo tokens (one-shot decoders and the open batch, swap and auto
modes); adapters with non-finite weights are refused at load; the sampler never raises for parameters
inside the validated ranges; caller mistakes raise the project's errors; a name whose bytes change is never
served from a stale cache; no sequence of joins, steps, leaves and closes leaves a row or busy count behind."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import torch

from adapterhub_local.errors import AdapterHubError, ConfigError, FormatError, UnsupportedError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.inference.adapters import prepare
from adapterhub_local.inference.sampling import next_tokens
from adapterhub_local.inference.types import (
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    GenerationResult,
    RowFailedError,
    StreamEvent,
)
from adapterhub_local.registry import Registry
from tests.inference.faults_kit import poison

POISONED = "r4-qv"
MIX: list[str | None] = ["r1-q", "r2-v", POISONED, "r8-attn", "soft", None, "r16-mlp", "r64-ko"]


def mixed_requests() -> list[Request]:
    """Eight rows: different adapters, prompts, lengths; some sampled with seeds, one with a penalty."""
    out = []
    for i, adapter in enumerate(MIX):
        sampled = i % 3 == 1
        out.append(Request(prompt=f"row {i}: " + "xyz"[: i % 4], adapter=adapter, sampling=SamplingParams(
            max_new_tokens=4 + (3 * i) % 9, stop_at_eos=False, temperature=0.8 if sampled else 0.0,
            seed=7 + i if sampled else None, top_p=0.9 if sampled else 1.0,
            repetition_penalty=1.2 if i == 3 else 1.0)))
    return out



@pytest.fixture(scope="module")
def solo(zoo: Registry) -> list[GenerationResult]:
    engine = Engine(zoo, "tiny", mode="swap")
    return [engine.generate([r])[0] for r in mixed_requests()]


def check_isolated(events: list[StreamEvent], solo: list[GenerationResult], bad: int) -> None:
    finished = {e.index: e for e in events if e.finished}
    assert sorted(finished) == list(range(len(solo)))
    assert isinstance(finished[bad].error, RowFailedError) and finished[bad].result is None
    for i, expected in enumerate(solo):
        if i == bad:
            continue
        got = finished[i].result
        assert finished[i].error is None and got is not None, f"row {i} failed with its poisoned neighbour"
        assert got.token_ids == expected.token_ids, f"row {i} differs from its solo run"
        assert [t for e in events if e.index == i for t in e.token_ids] == expected.token_ids


@pytest.mark.parametrize("mode", ["swap", "auto"])
@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_a_poisoned_row_ends_alone_in_a_one_shot_batch(zoo: Registry, solo: list[GenerationResult], mode: str,
                                                       decoder: str) -> None:
    engine = Engine(zoo, "tiny", mode=mode, decoder=decoder)  # type: ignore[arg-type]
    poison(engine, f"{POISONED}@1")
    events = list(engine.generate_stream(mixed_requests()))
    check_isolated(events, solo, MIX.index(POISONED))
    with pytest.raises(RowFailedError, match="not finite"):
        engine.generate(mixed_requests())


@pytest.mark.parametrize("mode", ["swap", "auto"])
@pytest.mark.parametrize("first", [3, 8], ids=["staggered", "together"])
def test_a_poisoned_row_ends_alone_in_an_open_batch(zoo: Registry, solo: list[GenerationResult], mode: str,
                                                    first: int) -> None:
    engine = Engine(zoo, "tiny", mode=mode)  # type: ignore[arg-type]
    poison(engine, f"{POISONED}@1")
    batch = engine.open_batch(max_rows=8)
    reqs = mixed_requests()
    batch.join(reqs[:first], list(range(first)))  # the poisoned row is in the first group; the rest join later
    events = batch.step()
    batch.join(reqs[first:], list(range(first, 8)))
    while batch:
        events += batch.step()
    check_isolated(events, solo, MIX.index(POISONED))
    assert engine.open_rows == 0 and not engine.pool.busy
    engine.pool.rows.check()


def test_adapters_with_non_finite_weights_are_refused_at_load(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    for value in (float("nan"), float("inf"), -float("inf"), 1e39):  # 1e39 overflows fp32
        loaded = zoo.load_adapter("r8-attn", base="tiny")
        key = next(k for k in loaded.tensors if "lora_A" in k)
        loaded.tensors[key] = loaded.tensors[key].double()
        loaded.tensors[key][0, 0] = value
        with pytest.raises(FormatError, match="NaN or inf"):
            prepare(loaded, engine.runner.model, torch.float32)
    loaded = zoo.load_adapter("soft", base="tiny")
    loaded.tensors["prompt_embeddings"][1, 2] = float("nan")
    with pytest.raises(FormatError, match="prompt_embeddings"):
        prepare(loaded, engine.runner.model, torch.float32)


EXTREMES: list[dict[str, Any]] = [
    {"temperature": MIN_TEMPERATURE}, {"temperature": MAX_TEMPERATURE}, {"temperature": 1.0, "top_p": 1e-30},
    {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 0.7, "top_k": MAX_TOP_K}, {"temperature": 0.7, "top_k": 1},
    {"repetition_penalty": MIN_REPETITION_PENALTY}, {"repetition_penalty": MAX_REPETITION_PENALTY},
    {"temperature": 1.0, "seed": MAX_SEED}, {"temperature": 1.0, "seed": 0},
    {"temperature": MIN_TEMPERATURE, "top_k": 3, "top_p": 1e-9, "repetition_penalty": MIN_REPETITION_PENALTY},
]


def test_the_sampler_never_raises_inside_the_validated_ranges() -> None:
    vocab = 50
    scales = [1.0, 1e4, 1e30, 3e36]  # up to logits near fp32's limit
    rows = []
    for k, scale in enumerate(scales):
        row = torch.randn(vocab, generator=torch.Generator().manual_seed(k)) * scale
        row[k] = float("-inf")  # masked tokens, as a processor may leave
        rows.append(row)
    logits = torch.stack(rows)
    for params in EXTREMES:
        sampling = SamplingParams(**params)
        assert sampling.problems() == []
        history = [list(range(10))] * len(scales)
        tokens, ok = next_tokens(logits, [sampling] * len(scales), history)
        assert ((tokens >= 0) & (tokens < vocab)).all(), params
        assert not (ok.logical_not() & (tokens != 0)).any()
        chosen = [int(t) for t, good in zip(tokens, ok, strict=True) if good]
        assert all(logits[i, t] > float("-inf") for i, t in enumerate(chosen)), params
        if sampling.temperature == MIN_TEMPERATURE and sampling.repetition_penalty == 1.0:
            for i in range(1, len(scales)):  # gaps far above the temperature: sampling is argmax
                assert int(tokens[i]) == int(logits[i].argmax()), (params, scales[i])


@pytest.mark.parametrize("sampled", [True, False])
def test_non_finite_rows_are_flagged_and_the_others_untouched(sampled: bool) -> None:
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    logits[1, 5] = float("nan")
    logits[3, 0] = float("inf")
    logits[4] = float("-inf")
    logits[5, :30] = float("-inf")  # masked tokens: still a valid row
    logits[0, 7] = logits[0, 21] = logits[0].max() + 1  # a tie: greedy takes the first maximum
    params = [SamplingParams(temperature=0.9 if i % 2 and sampled else 0.0, seed=i) for i in range(6)]

    tokens, ok = next_tokens(logits, params, [[0, 1, 2]] * 6)
    assert ok.tolist() == [True, False, True, False, False, True]
    assert int(tokens[0]) == 7 and int(tokens[2]) == int(logits[2].argmax())
    for i in (0, 2, 5):  # each healthy row: what it gets alone
        alone, _ = next_tokens(logits[i:i + 1], params[i:i + 1], [[0, 1, 2]])
        assert int(tokens[i]) == int(alone[0])


@pytest.mark.parametrize("params", [
    {"temperature": 1e-300}, {"temperature": 1e-4}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"temperature": -0.5}, {"temperature": 1e6}, {"top_p": 0.0}, {"top_p": float("nan")}, {"top_k": -1},
    {"top_k": 2**40}, {"repetition_penalty": 0.0}, {"repetition_penalty": 1e-9}, {"repetition_penalty": 1e9},
    {"repetition_penalty": float("nan")}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}, {"max_new_tokens": 0},
    {"max_new_tokens": True}, {"stop": ["x" * 300]}, {"stop": [""]}, {"stop": "abc"},
])
def test_parameters_outside_the_ranges_are_refused(zoo: Registry, params: dict[str, Any]) -> None:
    sampling = SamplingParams(**params)
    assert sampling.problems()
    engine = Engine(zoo, "tiny")
    with pytest.raises(ConfigError):
        engine.generate([Request(prompt="hi", sampling=sampling)])


@pytest.mark.parametrize("request_", [
    Request(prompt=[1, 2, 10_000]), Request(prompt=[-1, 5]), Request(prompt=[1, True]), Request(prompt=[]),
    Request(prompt=[1, 2.5]),  # type: ignore[list-item]
    Request(prompt=b"bytes"),  # type: ignore[arg-type]
    Request(prompt="a", messages=[{"role": "user", "content": "b"}]), Request(),
    Request(messages=[{"role": "user"}]),
    Request(prompt="a", adapter=""), Request(prompt="a", adapter=3),  # type: ignore[arg-type]
])
def test_caller_mistakes_raise_the_projects_errors(zoo: Registry, request_: Request) -> None:
    engine = Engine(zoo, "tiny")
    for call in (engine.generate, engine.logits):
        with pytest.raises(AdapterHubError):
            call([request_])
    with pytest.raises(AdapterHubError):
        engine.open_batch().join([request_], [0])
    assert engine.open_rows == 0
    with pytest.raises(UnsupportedError):
        engine.generate("not a list")  # type: ignore[arg-type]


class Moving:
    """The registry, except that ``moving@1`` names whichever real version ``target`` says (as a deleted and
    reused version number, or a re-import, would)."""

    def __init__(self, registry: Registry, target: str) -> None:
        self.registry = registry
        self.target = target

    def resolve(self, ref: str) -> Any:
        if ref.startswith("moving"):
            return dataclasses.replace(self.registry.resolve(self.target), name="moving", version=1)
        return self.registry.resolve(ref)

    def load_adapter(self, ref: str, base: str | None = None) -> Any:
        if ref.startswith("moving"):
            loaded = self.registry.load_adapter(self.target, base=base)
            return dataclasses.replace(loaded, card=self.resolve(ref))
        return self.registry.load_adapter(ref, base=base)


@pytest.mark.parametrize("mode", ["swap", "merge"])
def test_a_name_whose_bytes_change_is_never_served_stale(zoo: Registry, mode: str) -> None:
    engine = Engine(zoo, "tiny", mode=mode)  # type: ignore[arg-type]
    moving = Moving(zoo, "r2-v@1")
    engine.pool.registry = moving  # type: ignore[assignment]
    request = Request(prompt="the same name", adapter="moving@1",
                      sampling=SamplingParams(max_new_tokens=8, stop_at_eos=False))
    answers = {}
    for target in ("r2-v@1", "r8-attn@1", "r2-v@1"):
        moving.target = target
        got = engine.generate([request])[0]
        expected = engine.generate([dataclasses.replace(request, adapter=target)])[0]
        assert got.token_ids == expected.token_ids, f"moving@1 served stale weights after moving to {target}"
        assert got.adapter == "moving@1"
        answers[target] = got.token_ids
    assert answers["r2-v@1"] != answers["r8-attn@1"], "the two versions must differ for this test to mean anything"


def test_no_sequence_of_operations_leaves_a_row_behind(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    adapters: list[str | None] = ["r1-q", "r2-v", "r4-qv", "r8-attn", "soft", None]
    rng = random.Random(5)
    for trial in range(6):
        batch = engine.open_batch(max_rows=6)
        key = 0
        for _ in range(40):
            op = rng.random()
            if op < 0.35 and len(batch) < 6:
                n = rng.randint(1, min(3, 6 - len(batch)))
                reqs = [Request(prompt="p" * rng.randint(1, 5), adapter=rng.choice(adapters),
                                sampling=SamplingParams(max_new_tokens=rng.randint(1, 6), stop_at_eos=False))
                        for _ in range(n)]
                batch.join(reqs, list(range(key, key + n)))
                key += n
            elif op < 0.55 and key:
                batch.leave(rng.randrange(key))  # any key: live, finished awaiting reclaim, gone, or waiting
            elif op < 0.6 and trial % 2:
                batch.close()
            else:
                batch.step()
            engine.pool.rows.check()
            assert engine.open_rows >= len(batch)
        while batch:
            batch.step()
            engine.pool.rows.check()
        if trial % 3 == 0:
            batch.close()
        # a batch with nothing unfinished holds nothing: finished rows awaiting reclaim were released
        assert engine.open_rows == 0 and not engine.pool.busy, f"trial {trial} left rows behind"
    engine.merge("r8-attn")  # nothing holds rows, so merging is allowed
    engine.unmerge()


@pytest.mark.parametrize("decoder", ["dynamic", "auto"])
def test_a_finished_row_awaiting_reclaim_is_released_when_its_neighbour_leaves(zoo: Registry, decoder: str) -> None:
    """On the growing cache a finished row's cache row waits to be reclaimed; on the slab (auto) it is freed
    at once. Either way nothing stays busy once the others leave."""
    engine = Engine(zoo, "tiny", decoder=decoder)
    batch = engine.open_batch()
    short = Request(prompt="short", adapter="r1-q", sampling=SamplingParams(max_new_tokens=1, stop_at_eos=False))
    long = Request(prompt="long", adapter="r2-v", sampling=SamplingParams(max_new_tokens=50, stop_at_eos=False))
    batch.join([short, long, long], [0, 1, 2])
    batch.step()  # row 0 finishes; on the growing cache its cache row waits to be reclaimed
    assert batch.keys == [1, 2] and engine.open_rows == (3 if decoder == "dynamic" else 2)
    batch.leave(1)
    batch.leave(2)
    assert engine.open_rows == 0 and not engine.pool.busy
