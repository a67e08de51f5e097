"""The adapter pool: LRU by bytes over device/host/disk, pinning; eviction never changes an answer."""

from __future__ import annotations

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import Registry
from tests.inference.conftest import LORA_SPECS


def sizes(zoo: Registry) -> dict[str, int]:
    engine = Engine(zoo, "tiny")
    return {ref: engine.pool.nbytes(engine.pool.resolve(ref)) for ref in LORA_SPECS}


def test_small_pool_gives_identical_answers_while_evicting(zoo: Registry) -> None:
    nbytes = sizes(zoo)
    capacity = max(nbytes.values()) + min(nbytes.values())  # never holds all seven, always holds the largest
    assert capacity < sum(nbytes.values())
    big = Engine(zoo, "tiny", pool_bytes=1 << 30)
    small = Engine(zoo, "tiny", pool_bytes=capacity, host_bytes=capacity)  # host tier too small: disk reloads
    refs = list(LORA_SPECS)
    requests = [Request(prompt=f"row {i}", adapter=refs[i % len(refs)], sampling=SamplingParams(max_new_tokens=6))
                for i in range(2 * len(refs))]
    for _ in range(2):  # a second round reloads what the first evicted
        for want, got in zip(big.logits(requests), small.logits(requests), strict=True):
            assert torch.equal(want.logits, got.logits) or torch.allclose(want.logits, got.logits, atol=1e-5)
        assert [r.token_ids for r in big.generate(requests)] == [r.token_ids for r in small.generate(requests)]
    stats = small.stats()
    assert stats.evictions > 0 and stats.misses > len(refs)  # evicted and reloaded from disk
    assert stats.resident_bytes <= capacity
    assert big.stats().evictions == 0


def test_lru_order_and_pinning(zoo: Registry) -> None:
    a, b, c = "r1-q", "r2-v", "r4-qv"
    probe = Engine(zoo, "tiny").pool
    engine = Engine(zoo, "tiny", pool_bytes=probe.footprint({probe.resolve(r) for r in (a, b, c)}) - 1)
    engine.pin(a)
    engine.load(b)
    engine.load(c)  # over budget: the least recently used unpinned adapter (b) goes
    tiers = {info.ref.split("@")[0]: info for info in engine.adapters()}
    assert tiers[a].tier == "device" and tiers[a].pinned
    assert tiers[b].tier == "host" and tiers[c].tier == "device"
    engine.unpin(a)
    engine.load(b)  # now a is the LRU unpinned one
    assert {i.ref.split("@")[0] for i in engine.adapters() if i.tier == "device"} == {b, c}


def test_adapter_larger_than_pool_is_a_clear_error(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", pool_bytes=16)
    with pytest.raises(UnsupportedError, match="pool_bytes"):
        engine.logits([Request(prompt="x", adapter="r32-all")])


def test_unload_and_hit_counters(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    engine.logits([Request(prompt="x", adapter="r2-v")])
    engine.logits([Request(prompt="y", adapter="r2-v")])
    stats = engine.stats()
    assert (stats.misses, stats.hits, stats.host_hits) == (1, 1, 0)
    engine.unload("r2-v")
    assert engine.adapters() == []
    engine.logits([Request(prompt="z", adapter="r2-v")])
    assert engine.stats().misses == 2


def test_rank_padding_counts_in_the_budget(zoo: Registry) -> None:
    """r64-ko and r8-attn share k_proj and o_proj, where the stacks hold both at rank 64: together they need far
    more than their own bytes, and a pool sized for their own bytes holds one at a time."""
    probe = Engine(zoo, "tiny")
    big, small = (probe.pool.resolve(r) for r in ("r64-ko", "r8-attn"))
    own = probe.pool.nbytes(big) + probe.pool.nbytes(small)
    padded = probe.pool.footprint({big, small})
    assert padded > own
    probe.load(big)
    probe.load(small)
    stats = probe.stats()
    assert stats.resident_bytes == padded
    used = sum(w.active * w.rank * (w.d_in + w.d_out) * w.a_stack.element_size()
               for w in probe.runner.model.modules() if hasattr(w, "a_stack"))
    assert used == padded, "the budget is what the stacks hold for the resident adapters"
    assert stats.stack_bytes >= used

    engine = Engine(zoo, "tiny", pool_bytes=own)
    requests = [Request(prompt="padded", adapter="r64-ko"), Request(prompt="pool", adapter="r8-attn")]
    got = engine.logits(requests)  # do not fit together: the engine runs them in two chunks
    assert engine.stats().resident_bytes <= own and engine.stats().evictions >= 1
    for want, row in zip(probe.logits(requests), got, strict=True):
        torch.testing.assert_close(row.logits, want.logits, atol=1e-5, rtol=0)


def test_evicting_the_largest_adapter_shrinks_the_stacks(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    engine.load("r8-attn")
    engine.load("r64-ko")
    k_proj = engine.runner.model.get_submodule("model.layers.0.self_attn.k_proj")
    assert k_proj.rank == 64
    engine.unload("r64-ko")
    assert k_proj.rank == 8
    assert engine.stats().resident_bytes == engine.pool.footprint({engine.pool.resolve("r8-attn")})
