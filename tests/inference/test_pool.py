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
    nbytes = sizes(zoo)
    a, b, c = "r1-q", "r2-v", "r4-qv"
    engine = Engine(zoo, "tiny", pool_bytes=nbytes[a] + nbytes[b] + nbytes[c] - 1)
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
