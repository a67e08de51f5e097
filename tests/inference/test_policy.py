"""``mode="auto"``: merge under one-adapter traffic, swap under mixed traffic, answers unchanged, switch logged."""

from __future__ import annotations

import logging

import pytest
import torch

from adapterhub_local.inference import AutoPolicy, Engine, Request
from adapterhub_local.registry import Registry


def test_auto_mode_merges_under_one_adapter_traffic_and_logs(zoo: Registry, caplog: pytest.LogCaptureFixture) -> None:
    policy = AutoPolicy(window=8, threshold=0.75, min_requests=4)
    auto = Engine(zoo, "tiny", mode="auto", policy=policy)
    swap = Engine(zoo, "tiny", mode="swap")
    hot = [Request(prompt=f"hot {i}", adapter="r16-mlp") for i in range(4)]
    mixed = [Request(prompt="m1", adapter="r2-v"), Request(prompt="m2", adapter="soft"), Request(prompt="m3")]
    with caplog.at_level(logging.INFO, logger="adapterhub_local.inference"):
        for batch, merged in [(hot, True), (hot, True), (mixed, False)]:
            got = auto.logits(batch)
            assert (auto.merged is not None) == merged
            for a, b in zip(got, swap.logits(batch), strict=True):
                torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert any("swap -> merge" in r.getMessage() for r in caplog.records)
    for _ in range(3):
        auto.logits(mixed)
    assert policy.decision is None and auto.merged is None


def test_policy_needs_evidence() -> None:
    policy = AutoPolicy(window=10, threshold=0.9, min_requests=5)
    policy.observe(["a"] * 4)
    assert policy.decide({"a"}) is None
    policy.observe(["a"])
    assert policy.decide({"a"}) == "a"
    policy.observe(["b", "b"])
    assert policy.decide({"a", "b"}) is None  # 5 of 7 is below 90 %
    assert policy.decide(set()) is None
