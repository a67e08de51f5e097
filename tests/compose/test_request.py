"""Per-request compositions in the engine: a composed row = the stored ``cat`` adapter's row = the weighted sum of
the deltas applied by hand; a mixed batch gives each row its solo answer; the pool builds a composition once and
keys it by content; bad compositions are refused with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapterhub_local.compose.combine import combine
from adapterhub_local.errors import (
    FingerprintMismatchError,
    InvalidReferenceError,
    NotFoundError,
    UnsupportedError,
)
from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request
from adapterhub_local.lora import lora_pairs
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_llama
from tests.peft_factory import save_lora

PROMPT = [1, 5, 9, 13, 2, 7, 40, 3]
MIX = "ta*0.7+tb*-0.3"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def engine(composed_registry: Registry) -> Engine:
    combine(composed_registry, ["ta", "tb"], [0.7, -0.3], "mix")
    return Engine(composed_registry, "tiny", mode="swap", device="cpu")


def _logits(engine: Engine, adapter: str | None, prompt: list[int] = PROMPT) -> torch.Tensor:
    return engine.logits([Request(prompt=prompt, adapter=adapter)])[0].logits


def _by_hand(registry: Registry, weights: dict[str, float]) -> torch.Tensor:
    """The base with ``W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` written into its weights, run plainly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(registry.base("tiny").path).eval()
    with torch.no_grad():
        for ref, weight in weights.items():
            loaded = registry.load_adapter(ref)
            for module, pair in lora_pairs(loaded.tensors, loaded.config).items():
                model.get_submodule(module).weight += weight * pair.delta()
        return model(torch.tensor([PROMPT])).logits[0]


def test_composed_row_equals_stored_cat_and_the_sum_by_hand(engine: Engine) -> None:
    composed = _logits(engine, MIX)
    stored = _logits(engine, "mix")
    assert torch.equal(composed, stored)  # the same operands, built by the same function
    torch.testing.assert_close(composed, _by_hand(engine.registry, {"ta": 0.7, "tb": -0.3}), atol=1e-5, rtol=0)
    assert not torch.allclose(composed, _logits(engine, "ta"), atol=1e-4)
    result = engine.logits([Request(prompt=PROMPT, adapter=MIX)])[0]
    assert result.adapter == "ta@1*0.7+tb@1*-0.3"


def test_mixed_batch_rows_equal_solo_rows(engine: Engine) -> None:
    adapters = [MIX, "ta", "sp", None, "tc*0.5+tb*2.0", "mix", MIX]
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:], PROMPT, PROMPT[:6], PROMPT[1:], PROMPT[:3]]
    batch = engine.logits([Request(prompt=p, adapter=a) for a, p in zip(adapters, prompts, strict=True)])
    for adapter, prompt, result in zip(adapters, prompts, batch, strict=True):
        torch.testing.assert_close(result.logits, _logits(engine, adapter, prompt), atol=1e-5, rtol=0)
    generated = engine.generate([Request(prompt=PROMPT, adapter=a) for a in adapters])
    for adapter, row in zip(adapters, generated, strict=True):
        assert row.token_ids == engine.generate([Request(prompt=PROMPT, adapter=adapter)])[0].token_ids


def test_pool_builds_a_composition_once_and_keys_it_by_content(engine: Engine) -> None:
    pool = engine.pool
    first = pool.resolve(MIX)
    assert pool.resolve("ta@1*0.7+tb:latest*-0.3".replace("tb:latest", "tb@1")) == first
    adapter = pool.get(first)
    assert adapter.rank == 6 and adapter.card.composition is not None
    assert pool.get(pool.resolve(MIX)) is adapter  # cached, not rebuilt
    engine.logits([Request(prompt=PROMPT, adapter=MIX)])
    assert pool.tier(first) == "device"
    assert pool.footprint({first}) >= adapter.nbytes  # counted like any adapter (Σ rᵢ ranks)
    other = pool.get(pool.resolve("ta*0.7+tb*-0.25"))
    assert other is not adapter and other.card.content_hash != adapter.card.content_hash


def test_bad_compositions_are_refused(engine: Engine, composed_registry: Registry, tmp_path: Path) -> None:
    composed_registry.add_base("other", str(make_tiny_llama(tmp_path / "other", seed=9)))
    save_lora(composed_registry.base("other").path, tmp_path / "oa", seed=4)
    composed_registry.register_adapter("oa", tmp_path / "oa", "other")
    cases: list[tuple[str, type[Exception], str]] = [
        ("ta*0.7+nope*0.3", NotFoundError, "'nope' is not registered"),
        ("ta*0.7+tb*nan", InvalidReferenceError, "not a plain finite number"),
        ("ta*0.7+tb*1e400", InvalidReferenceError, "not finite"),
        ("ta*0.7+tb*0", InvalidReferenceError, "adds nothing"),
        ("+".join(f"ta@1*{i + 1}" for i in range(9)), InvalidReferenceError, "at most 8"),
        ("ta*0.7+oa*0.3", FingerprintMismatchError, "not on base 'tiny'"),
        ("ta*0.7+sp*0.3", UnsupportedError, "soft prompt"),
        ("ta*0.7+ta@1*0.3", InvalidReferenceError, "more than once"),
        ("ta*0.7+tb", InvalidReferenceError, "not REF\\*WEIGHT"),
        ("ta*0.7 + tb*0.3", InvalidReferenceError, "whitespace"),
    ]
    for text, error, message in cases:
        with pytest.raises(error, match=message):
            engine.logits([Request(prompt=PROMPT, adapter=text)])


def test_a_dora_parent_is_refused(engine: Engine, composed_registry: Registry, tmp_path: Path) -> None:
    from tests.inference.test_dora import dora_dir

    dora_dir(composed_registry.base("tiny").path, tmp_path / "td", rank=2, targets=["q_proj"], seed=8)
    composed_registry.register_adapter("td", tmp_path / "td", "tiny")
    with pytest.raises(UnsupportedError, match=r"td@1 in 'ta@1\*0\.5\+td@1\*0\.5' uses DoRA"):
        engine.logits([Request(prompt=PROMPT, adapter="ta*0.5+td*0.5")])
    assert len(engine.logits([Request(prompt=PROMPT, adapter="td")])) == 1  # served on its own


def test_a_composition_merges_and_unmerges_exactly(engine: Engine) -> None:
    swapped = _logits(engine, MIX)
    base = _logits(engine, None)
    engine.set_mode("merge")
    torch.testing.assert_close(_logits(engine, MIX), swapped, atol=1e-5, rtol=0)
    assert engine.merged == "ta@1*0.7+tb@1*-0.3"
    engine.unmerge()
    assert torch.equal(_logits(engine, None), base)
