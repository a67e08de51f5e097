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


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.sampled_from([0, 1, 2, 3, 4, 40]), min_size=1, max_size=6), tokens=st.integers(1, 3),
       ranks=st.lists(st.integers(1, 9), min_size=3, max_size=3), strategy=st.sampled_from(["gather", "dense"]))
def test_multi_lora_op_equals_per_row_loop(rows: list[int], tokens: int, ranks: list[int], strategy: str) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    context = BatchContext(torch.device("cpu"), strategy=strategy)  # slots 4, 40: adapters not on this module
    layer = MultiLoraLinear(base, context, "layer")
    pairs = {}
    for slot, rank in enumerate(ranks, start=1):
        a, b = torch.randn(rank, 6), torch.randn(5, rank)
        layer.install(slot, a, b)
        pairs[slot] = (a, b)
    x = torch.randn(len(rows), tokens, 6)
    context.set_rows(rows)
    got = layer(x)
    for i, slot in enumerate(rows):
        expected = base(x[i])
        if slot in pairs:
            a, b = pairs[slot]
            expected = expected + x[i] @ a.T @ b.T
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


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
