"""Mixed batches: every row equals that row run alone, and swap mode equals PEFT."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.inference.multi_lora import BatchContext, MultiLoraLinear, dense_lora, gathered_lora
from adapterhub_local.registry import Registry
from tests.inference.conftest import LORA_SPECS

PROMPTS = ["The cat", "hello world, again", "x", "Numbers 12345", "abc def ghi jkl", "Q: why?", "ok", "Zebra zone!",
           "a b", "tail"]


def mixed_requests(max_new: int = 12) -> list[Request]:
    refs: list[str | None] = [*LORA_SPECS, "soft", None, "r4-qv"]  # 7 LoRA (ranks 1..64), soft, none, a repeat
    return [Request(prompt=PROMPTS[i], adapter=ref, sampling=SamplingParams(max_new_tokens=max_new))
            for i, ref in enumerate(refs)]


@pytest.fixture(scope="module")
def engine(zoo: Registry) -> Engine:
    return Engine(zoo, "tiny", mode="swap")


def test_mixed_batch_logits_equal_solo_rows(engine: Engine) -> None:
    requests = mixed_requests()
    assert len({r.adapter for r in requests}) >= 9
    batched = engine.logits(requests)
    for request, result in zip(requests, batched, strict=True):
        solo = engine.logits([request])[0]
        assert result.logits.shape == solo.logits.shape
        torch.testing.assert_close(result.logits, solo.logits, atol=1e-5, rtol=0)


def test_adapters_change_the_output(engine: Engine) -> None:
    # guards the test above against adapters that do nothing
    prompt = "same prompt"
    base = engine.logits([Request(prompt=prompt)])[0].logits
    for ref in [*LORA_SPECS, "soft"]:
        assert not torch.allclose(engine.logits([Request(prompt=prompt, adapter=ref)])[0].logits, base, atol=1e-3)


def test_dense_strategy_equals_gather(zoo: Registry, engine: Engine) -> None:
    dense = Engine(zoo, "tiny", lora_strategy="dense")
    assert dense.runner.context.strategy == "dense" and engine.runner.context.strategy == "gather"
    requests = mixed_requests()
    for d, g in zip(dense.logits(requests), engine.logits(requests), strict=True):
        torch.testing.assert_close(d.logits, g.logits, atol=1e-5, rtol=0)
    assert [r.token_ids for r in dense.generate(requests)] == [r.token_ids for r in engine.generate(requests)]


def test_mixed_batch_greedy_text_equals_solo(engine: Engine) -> None:
    requests = mixed_requests(max_new=16)
    batched = engine.generate(requests)
    for request, result in zip(requests, batched, strict=True):
        solo = engine.generate([request])[0]
        assert result.token_ids == solo.token_ids
        assert result.text == solo.text
        assert result.adapter == (None if request.adapter is None else engine.pool.resolve(request.adapter))


@pytest.mark.parametrize("ref", ["r1-q", "r8-attn", "r32-all", "r64-ko"])
def test_swap_logits_match_peft(zoo: Registry, engine: Engine, ref: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    card, path = zoo.verified_path(ref, "tiny")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base("tiny").path), path).eval()
    ids = engine.runner.encode(Request(prompt="compare with peft"))
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0]
    # in a batch with other adapters, to make sure the row is still PEFT's
    got = engine.logits([Request(prompt="other row", adapter="r2-v"), Request(prompt=ids, adapter=ref)])[1].logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    del card


def test_base_rows_leave_the_base_model_untouched(zoo: Registry, engine: Engine) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(zoo.base("tiny").path).eval()
    ids = engine.runner.encode(Request(prompt="plain base"))
    with torch.no_grad():
        expected = plain(input_ids=torch.tensor([ids])).logits[0]
    got = engine.logits([Request(prompt=ids), Request(prompt="x", adapter="r32-all")])[0].logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.sampled_from([0, 1, 2, 3, 4, 40]), min_size=1, max_size=6), tokens=st.integers(1, 3),
       ranks=st.lists(st.integers(1, 20), min_size=3, max_size=3), strategy=st.sampled_from(["gather", "dense"]),
       budget=st.sampled_from([0, 1 << 20]))
def test_multi_lora_op_equals_per_row_loop(rows: list[int], tokens: int, ranks: list[int], strategy: str,
                                           budget: int) -> None:
    """Every row gets its own adapter's delta, whatever the rank groups, and whether the gathered operands are
    kept for the batch (budget) or gathered per step (budget 0), over several steps of one batch."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    # slots 4, 40: adapters not on this module
    context = BatchContext(torch.device("cpu"), strategy=strategy, gather_budget=budget)
    layer = MultiLoraLinear(base, context, "layer")
    pairs = {}
    for slot, rank in enumerate(ranks, start=1):
        a, b = torch.randn(rank, 6), torch.randn(5, rank)
        layer.install(slot, a, b)
        pairs[slot] = (a, b)
    context.set_rows(rows)
    for _ in range(2):  # steps of one batch: the second reuses the first's operands
        x = torch.randn(len(rows), tokens, 6)
        got = layer(x)
        for i, slot in enumerate(rows):
            expected = base(x[i])
            if slot in pairs:
                a, b = pairs[slot]
                expected = expected + x[i] @ a.T @ b.T
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


def gather_layer(budget: int = 1 << 20) -> tuple[MultiLoraLinear, BatchContext]:
    """A gather-strategy layer with a rank-16 adapter (slot 1), a rank-12 one (slot 2) and a rank-32 one (3)."""
    torch.manual_seed(0)
    context = BatchContext(torch.device("cpu"), strategy="gather", gather_budget=budget)
    layer = MultiLoraLinear(torch.nn.Linear(8, 6), context, "layer")
    for slot, rank in ((1, 16), (2, 12), (3, 32)):
        layer.install(slot, torch.randn(rank, 8), torch.randn(6, rank))
    return layer, context


def test_rows_compute_at_their_own_rank_bucket_not_the_batch_max() -> None:
    """A composed (rank-32) row does not make the rank-16 rows compute at rank 32; a row with no adapter on
    the module is not computed; rows of one bucket share one group at its largest rank."""
    layer, context = gather_layer()
    context.set_rows([1, 3, 0, 2, 1])
    layer(torch.randn(5, 1, 8))
    groups = context.operands["layer"]
    assert [(g.rank, g.rows.tolist() if g.rows is not None else None) for g in groups] == [(16, [0, 3, 4]),
                                                                                           (32, [1])]
    assert [tuple(g.a.shape) for g in groups if g.a is not None] == [(3, 16, 8), (1, 32, 8)]
    context.set_rows([1, 2])  # one group of every row: no index ops per step
    layer(torch.randn(2, 1, 8))
    assert [(g.rank, g.rows) for g in context.operands["layer"]] == [(16, None)]


def test_gathered_operands_are_built_once_per_batch_and_bounded() -> None:
    layer, context = gather_layer()
    context.set_rows([1, 3])
    layer(torch.randn(2, 4, 8))  # prefill
    first = [g.a for g in context.operands["layer"]]
    layer(torch.randn(2, 1, 8))  # a decode step: the same operands, not gathered again
    assert all(a is b for a, b in zip(first, [g.a for g in context.operands["layer"]], strict=True))
    context.set_rows([1, 3])  # a new batch: built again, the old ones dropped
    layer(torch.randn(2, 1, 8))
    assert all(a is not b for a, b in zip(first, [g.a for g in context.operands["layer"]], strict=True))
    context.clear()
    assert context.operands == {}, "a finished batch keeps no operands"
    small, context = gather_layer(budget=(16 + 32) * (8 + 6) * 4 - 1)  # one byte short of both rows' operands
    context.set_rows([1, 3])
    x = torch.randn(2, 1, 8)
    got = small(x)
    assert all(g.a is None for g in context.operands["layer"]), "past the budget: gathered per step"
    full, context = gather_layer()
    context.set_rows([1, 3])
    torch.testing.assert_close(got, full(x), atol=0, rtol=0)


def test_padded_rank_shrinks_when_large_adapters_leave() -> None:
    layer = MultiLoraLinear(torch.nn.Linear(4, 4), BatchContext(torch.device("cpu")), "layer")
    layer.install(1, torch.randn(2, 4), torch.randn(4, 2))
    layer.install(2, torch.randn(16, 4), torch.randn(4, 16))
    assert layer.rank == 16
    layer.uninstall(2)
    assert layer.rank == 2 and layer.active == 1
    x = torch.randn(1, 1, 4)
    layer._context.set_rows([2])  # an uninstalled slot reads the zero slot
    torch.testing.assert_close(layer(x), layer.base(x))


def test_gathered_lora_shapes() -> None:
    x, a, b, rows = torch.randn(3, 2, 8), torch.randn(4, 5, 8), torch.randn(4, 5, 7), torch.tensor([0, 3, 3])
    out = gathered_lora(x, a, b, rows)
    assert out.shape == (3, 2, 7)
    torch.testing.assert_close(out[1], x[1] @ a[3].T @ b[3])


def test_dense_lora_equals_gathered() -> None:
    torch.manual_seed(0)
    x, a, b, rows = torch.randn(3, 2, 8), torch.randn(4, 5, 8), torch.randn(4, 5, 7), torch.tensor([0, 3, 1])
    owner = (rows[:, None] == torch.arange(4)[None, :]).float()
    dense = dense_lora(x, a.reshape(20, 8), b.reshape(20, 7), owner, 5)
    torch.testing.assert_close(dense, gathered_lora(x, a, b, rows))
