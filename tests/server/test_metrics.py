"""Prometheus exposition: counters add up, histogram buckets are cumulative and end at the count, label
values are escaped, pool stats are read at scrape time."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local.server.metrics import LATENCY_BUCKETS, ServerMetrics

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="(\\.|[^"\\])*",?)*\})? [-+0-9.eInf]+$')


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=50))
def test_histogram_is_cumulative_and_sums(values: list[float]) -> None:
    metrics = ServerMetrics()
    for v in values:
        metrics.request_done("completions", "m", 200, v)
    data = samples(metrics.render())
    buckets = [data[f'adapterhub_request_latency_seconds_bucket{{endpoint="completions",le="{b:g}"}}']
               for b in LATENCY_BUCKETS]
    buckets.append(data['adapterhub_request_latency_seconds_bucket{endpoint="completions",le="+Inf"}'])
    assert buckets == sorted(buckets)
    assert buckets[-1] == len(values) == data['adapterhub_request_latency_seconds_count{endpoint="completions"}']
    for bound, count in zip(LATENCY_BUCKETS, buckets, strict=False):
        assert count == sum(v <= bound for v in values)
    assert abs(data['adapterhub_request_latency_seconds_sum{endpoint="completions"}'] - sum(values)) < 1e-6 * (
        1 + sum(values))


def test_counters_per_model_and_escaping() -> None:
    stats = {"hits_total": 3, "resident_bytes": 1024}
    metrics = ServerMetrics(pool_stats=lambda: stats)
    metrics.tokens('we"ird\\name', 5, 7)
    metrics.tokens('we"ird\\name', 1, 2)
    metrics.tokens("lora1@1", 4, 0)
    metrics.batch(8, 3, [0.01, 0.02])
    text = metrics.render()
    data = samples(text)
    assert data['adapterhub_prompt_tokens_total{model="we\\"ird\\\\name"}'] == 6
    assert data['adapterhub_completion_tokens_total{model="we\\"ird\\\\name"}'] == 9
    assert data['adapterhub_prompt_tokens_total{model="lora1@1"}'] == 4
    assert data["adapterhub_batch_size_count"] == 1 and data["adapterhub_queue_wait_seconds_count"] == 2
    assert data["adapterhub_pool_hits_total"] == 3
    assert "# TYPE adapterhub_pool_hits_total counter" in text
    assert "# TYPE adapterhub_pool_resident_bytes gauge" in text
    stats["hits_total"] = 10
    assert samples(metrics.render())["adapterhub_pool_hits_total"] == 10
    assert text.endswith("\n")
