"""Per-adapter observability through the real app: ``/metrics`` and ``/admin/adapters`` count rows, tokens,
loads and merges per adapter exactly for a known sequence of requests, report residency, and name at most
``metrics_top_k`` adapters (the rest summed as ``other``) however many adapters were served."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from adapterhub_local.inference.usage import OTHER, UsageLedger
from adapterhub_local.registry import Registry
from adapterhub_local.server import ServerConfig
from adapterhub_local.server.auth import AuthConfig
from tests.server.conftest import API_KEY, make_app

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
SERIES = re.compile(r'^(adapterhub_adapter_[a-z_]+)\{adapter="([^"]+)"(?:,tier="([a-z]+)")?\} ([0-9.e+-]+)$')


def adapter_series(text: str) -> dict[tuple[str, str, str | None], float]:
    out: dict[tuple[str, str, str | None], float] = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            out[(match[1], match[2], match[3])] = float(match[4])
    return out


def complete(client: TestClient, model: str, prompt: str) -> dict[str, int]:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 3,
                                                    "temperature": 0})
    response.raise_for_status()
    usage: dict[str, int] = response.json()["usage"]
    return usage


def test_counts_match_a_known_sequence_and_labels_stay_bounded(served_registry: Registry) -> None:
    top_k = 3
    config = ServerConfig(auth=AuthConfig(api_key=API_KEY), metrics_top_k=top_k)
    traffic = {"lora0": 4, "lora1": 3, "lora2": 2, **{f"lora{i}": 1 for i in range(3, 9)}}  # 9 adapters > K
    expected: dict[str, list[int]] = {}
    with TestClient(make_app(served_registry, config)) as client:
        for model, count in traffic.items():
            for k in range(count):
                usage = complete(client, model, f"hi {k}")
                counts = expected.setdefault(f"{model}@1", [0, 0, 0])
                counts[0] += 1
                counts[1] += usage["prompt_tokens"]
                counts[2] += usage["completion_tokens"]
        classified = client.post("/v1/classify", json={"model": "sentiment", "input": ["good", "bad"]}).json()
        expected["sentiment@1"] = [2, classified["usage"]["prompt_tokens"], 0]
        series = adapter_series(client.get("/metrics").text)
        admin = client.get("/admin/adapters", headers=ADMIN).json()["usage"]
    named = {a for (_, a, _) in series}
    assert len(named) <= top_k + 1 and OTHER in named
    assert named - {OTHER} == {"lora0@1", "lora1@1", "lora2@1"}  # the most traffic
    for ref in ("lora0@1", "lora1@1", "lora2@1"):
        rows, prompt, completion = expected[ref]
        assert series[("adapterhub_adapter_rows", ref, None)] == rows
        assert series[("adapterhub_adapter_prompt_tokens", ref, None)] == prompt
        assert series[("adapterhub_adapter_completion_tokens", ref, None)] == completion
        assert series[("adapterhub_adapter_loads", ref, None)] == 1  # loaded from disk once, then resident
        assert series[("adapterhub_adapter_load_seconds", ref, None)] > 0
        assert series[("adapterhub_adapter_merges", ref, None)] == 0  # swap mode
        assert series[("adapterhub_adapter_resident", ref, "device")] == 1
        assert series[("adapterhub_adapter_resident", ref, "disk")] == 0
    rest = [r for r in expected if r not in ("lora0@1", "lora1@1", "lora2@1")]
    for column, stat in enumerate(("rows", "prompt_tokens", "completion_tokens")):
        assert series[(f"adapterhub_adapter_{stat}", OTHER, None)] == sum(expected[r][column] for r in rest)
    assert series[("adapterhub_adapter_loads", OTHER, None)] == len(rest)
    assert [e["adapter"] for e in admin["adapters"]] == ["lora0@1", "lora1@1", "lora2@1", OTHER]
    assert admin["adapters"][-1]["adapters"] == len(rest) and admin["top_k"] == top_k
    assert admin["adapters"][0]["rows"] == 4 and admin["adapters"][0]["residency"] == "device"
    assert sum(admin["residency"].values()) == len(expected)


def test_merges_and_residency_follow_the_engine(served_registry: Registry) -> None:
    config = ServerConfig(auth=AuthConfig(api_key=API_KEY), metrics_top_k=2)
    with TestClient(make_app(served_registry, config, mode="merge")) as client:
        for model in ("lora0", "lora1", "lora0", "lora0"):
            complete(client, model, "hello")
        series = adapter_series(client.get("/metrics").text)
        client.post("/admin/adapters/unload", json={"adapter": "lora1"}, headers=ADMIN).raise_for_status()
        after = adapter_series(client.get("/metrics").text)
    assert series[("adapterhub_adapter_merges", "lora0@1", None)] == 2  # merged, switched away, merged again
    assert series[("adapterhub_adapter_merges", "lora1@1", None)] == 1
    assert series[("adapterhub_adapter_rows", "lora0@1", None)] == 3
    assert after[("adapterhub_adapter_resident", "lora1@1", "disk")] == 1  # unloaded from every tier


def test_the_report_is_bounded_and_sums_to_the_total() -> None:
    ledger = UsageLedger()
    for i in range(50):
        ledger.served(f"a{i}@1", rows=i % 7 + 1, prompt_tokens=i)
    for k in (0, 1, 5, 49, 50, 80):
        report = ledger.report(k, lambda ref: "disk")
        assert len(report.entries) == min(k, 50) + (1 if k < 50 else 0)
        assert sum(e.usage.rows for e in report.entries) == sum(i % 7 + 1 for i in range(50))
        assert sum(e.adapters for e in report.entries) == 50
    top = ledger.report(3, lambda ref: "disk").entries
    assert [e.usage.rows for e in top[:3]] == [7, 7, 7] and top[0].adapter == "a48@1"  # ties: more tokens first
    with pytest.raises(ValueError):
        ledger.report(-1, lambda ref: "disk")
