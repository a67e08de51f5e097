"""Soak: N concurrent clients for T minutes against one real ``adapterhub serve`` process over 16 adapters, with
a mix of normal, abusive and disconnecting clients; reports what a production user would ask first.

* **normal** clients (closed loop) send well-formed completions and chats, streaming or not, greedy, over the
  16 adapters; every answer is compared with the answer the same server gave to that request *alone* before
  the soak (a "wrong answer" is any difference), and every 5xx counts against the server.
* **abusive** clients send the classes of bad input the server must refuse without harm: invalid JSON, a body
  over the limit, sampling parameters outside the sampler's ranges (tiny temperatures, huge seeds, NaN),
  whitespace variants of model names, unknown models, prompts far over the context, wrong admin keys.
  Their statuses are tallied; a 5xx among them is a server bug too.
* **disconnecting** clients start a request (streaming or not) and quit at a random point: mid-body, at once,
  while waiting, while reading.

Reported: requests served, 5xx for well-formed requests (target 0), wrong answers (target 0), abusive
statuses, the server's RSS at the start (after warm-up) and the end, p50/p99 latency of normal requests,
and the open rows the server reports once idle (``adapterhub_open_rows``, target 0).

    .venv/bin/python benchmarks/soak.py --clients 64 --minutes 5

Writes ``benchmarks/results/soak.json`` and ``.md`` (or ``--out DIR``). The model is a small random-weight
Llama built on the spot (no downloads): the run measures robustness and serving overhead, not quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.server_load import build, start_server, stop_server  # noqa: E402

API_KEY = "soak-key"
ADAPTERS = 16


@dataclass
class Tally:
    served: int = 0
    """Normal requests answered 200."""
    server_errors: int = 0
    """5xx (or a broken response) for well-formed requests."""
    wrong: int = 0
    """200 answers that differ from the request's solo answer."""
    latencies: list[float] = field(default_factory=list)
    abusive: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)


async def http(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
               timeout: float = 120.0) -> tuple[int, bytes]:
    """One HTTP/1.0 exchange (the server closes after the response, streams included): ``(status, body)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.0", "host: soak", f"content-length: {len(body)}",
                 "content-type: application/json", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


def answer_text(payload: bytes, stream: bool, chat: bool) -> str:
    if not stream:
        choice = json.loads(payload)["choices"][0]
        return str(choice["message"]["content"] if chat else choice["text"])
    text = []
    for line in payload.decode().split("\n\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if "error" in event:
            raise RuntimeError(f"in-band error: {event['error']}")
        for choice in event.get("choices", []):
            text.append(choice["delta"].get("content") or "" if chat else choice["text"])
    return "".join(text)


def normal_body(case: tuple[str, str, int, bool], stream: bool) -> tuple[str, dict[str, Any]]:
    model, prompt, tokens, chat = case
    body: dict[str, Any] = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def cases(count: int, rng: random.Random) -> list[tuple[str, str, int, bool]]:
    out = []
    for i in range(count):
        model = f"lora{i % ADAPTERS}" if i % 9 else "bench"
        out.append((model, f"soak case {i}: " + "abcxyz"[: rng.randint(0, 6)], rng.choice([4, 8, 16, 32]),
                    i % 4 == 0))
    return out


ABUSE: list[tuple[str, str, Any]] = [
    ("invalid-json", "/v1/completions", b"{not json"),
    ("body-over-limit", "/v1/completions", {"model": "lora1", "prompt": "x" * (3 << 20)}),
    ("tiny-temperature", "/v1/completions", {"model": "lora1", "prompt": "hi", "temperature": 1e-300}),
    ("huge-seed", "/v1/completions", {"model": "lora1", "prompt": "hi", "temperature": 1, "seed": 2**64}),
    ("nan-penalty", "/v1/completions", b'{"model": "lora1", "prompt": "hi", "repetition_penalty": NaN}'),
    ("negative-top-k", "/v1/completions", {"model": "lora1", "prompt": "hi", "top_k": -1}),
    ("whitespace-model", "/v1/completions", {"model": " lora1\n", "prompt": "hi"}),
    ("unknown-model", "/v1/completions", {"model": "no-such-adapter", "prompt": "hi"}),
    ("prompt-over-context", "/v1/completions", {"model": "lora2", "prompt": "y" * 400_000}),
    ("chat-over-context", "/v1/chat/completions", {"model": "lora2", "messages": [
        {"role": "user", "content": "z" * 200_000}]}),
    ("huge-max-tokens", "/v1/completions", {"model": "lora1", "prompt": "hi", "max_tokens": 10**9}),
    ("empty-messages", "/v1/chat/completions", {"model": "lora1", "messages": []}),
    ("admin-wrong-key", "/admin/adapters", None),
]


async def normal_client(port: int, rng: random.Random, reference: dict[int, str],
                        suite: list[tuple[str, str, int, bool]], tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        k = rng.randrange(len(suite))
        stream = rng.random() < 0.5
        path, body = normal_body(suite[k], stream)
        started = time.perf_counter()
        try:
            status, payload = await http(port, "POST", path, json.dumps(body).encode())
            if status != 200:
                tally.server_errors += status >= 500
                if status >= 500:
                    tally.samples.append(f"{status}: {payload[:200]!r}")
                continue
            text = answer_text(payload, stream, suite[k][3])
        except Exception as exc:  # a broken response for a well-formed request counts against the server
            tally.server_errors += 1
            tally.samples.append(f"{type(exc).__name__}: {exc}")
            continue
        tally.latencies.append(time.perf_counter() - started)
        tally.served += 1
        if text != reference[k]:
            tally.wrong += 1
            tally.samples.append(f"wrong answer for case {k}: {text!r} != {reference[k]!r}")


async def abusive_client(port: int, rng: random.Random, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        name, path, body = rng.choice(ABUSE)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        method = "GET" if body is None else "POST"
        try:
            status, _ = await http(port, method, path, raw, {"authorization": "Bearer wrong"})
        except Exception as exc:
            tally.abusive[f"{name}: {type(exc).__name__}"] += 1
            continue
        tally.abusive[f"{name}: {status}"] += 1
        await asyncio.sleep(rng.uniform(0, 0.05))


async def disconnecting_client(port: int, rng: random.Random, suite: list[tuple[str, str, int, bool]], tally: Tally,
                               until: float) -> None:
    while time.monotonic() < until:
        model, prompt, _, chat = suite[rng.randrange(len(suite))]
        path, body = normal_body((model, prompt, rng.randint(32, 160), chat), rng.random() < 0.5)
        raw = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
                f"content-length: {len(raw)}\r\n\r\n").encode()
        point = rng.choice(["mid-body", "at-once", "waiting", "reading"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally.disconnects["connect-failed"] += 1
            continue
        try:
            if point == "mid-body":
                writer.write(head + raw[: len(raw) // 2])
            else:
                writer.write(head + raw)
            await writer.drain()
            if point == "waiting":
                await asyncio.sleep(rng.uniform(0, 1.0))
            elif point == "reading":
                await asyncio.wait_for(reader.read(rng.randint(1, 300)), 30)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
        tally.disconnects[point] += 1
        await asyncio.sleep(rng.uniform(0, 0.1))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def gauge(port: int, name: str) -> float:
    _, payload = await http(port, "GET", "/metrics")
    for line in payload.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def soak(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    suite = cases(args.cases, rng)
    reference: dict[int, str] = {}
    for k, case in enumerate(suite):  # each request alone, before the soak: the answers to match
        path, body = normal_body(case, False)
        status, payload = await http(port, "POST", path, json.dumps(body).encode())
        assert status == 200, payload
        reference[k] = answer_text(payload, False, case[3])
    rss_start = rss_mb(pid)
    tally = Tally()
    until = time.monotonic() + args.minutes * 60
    n_abusive = max(1, round(args.clients * args.abusive))
    n_leaving = max(1, round(args.clients * args.disconnecting))
    n_normal = args.clients - n_abusive - n_leaving
    tasks = [normal_client(port, random.Random(rng.random()), reference, suite, tally, until) for _ in range(n_normal)]
    tasks += [abusive_client(port, random.Random(rng.random()), tally, until) for _ in range(n_abusive)]
    tasks += [disconnecting_client(port, random.Random(rng.random()), suite, tally, until) for _ in range(n_leaving)]
    started = time.monotonic()
    await asyncio.gather(*tasks)
    wall = time.monotonic() - started
    deadline = time.monotonic() + 60
    open_rows = await gauge(port, "adapterhub_open_rows")
    while open_rows and time.monotonic() < deadline:  # abandoned rows leave at the next decode step
        await asyncio.sleep(0.2)
        open_rows = await gauge(port, "adapterhub_open_rows")
    after = 0
    for k in range(min(8, len(suite))):  # solo answers still hold after the soak
        path, body = normal_body(suite[k], False)
        status, payload = await http(port, "POST", path, json.dumps(body).encode())
        after += status == 200 and answer_text(payload, False, suite[k][3]) == reference[k]
    latencies = sorted(tally.latencies)

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "clients": {"normal": n_normal, "abusive": n_abusive, "disconnecting": n_leaving},
        "seconds": round(wall, 1), "served": tally.served, "server_errors_well_formed": tally.server_errors,
        "wrong_answers": tally.wrong, "abusive_requests": sum(tally.abusive.values()),
        "abusive_5xx": sum(n for k, n in tally.abusive.items() if k.rsplit(": ", 1)[1].startswith("5")),
        "abusive_statuses": dict(sorted(tally.abusive.items())), "disconnects": dict(sorted(tally.disconnects.items())),
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_mb(pid), 1),
        "p50_ms": round(pct(0.5), 1), "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else float("nan"),
        "open_rows_after": open_rows, "solo_answers_after": f"{after}/{min(8, len(suite))}",
        "samples": tally.samples[:10],
    }


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    c = result["clients"]
    rows = [
        ("clients (normal / abusive / disconnecting)", f"{c['normal']} / {c['abusive']} / {c['disconnecting']}"),
        ("duration", f"{result['seconds']} s"),
        ("well-formed requests served", result["served"]),
        ("5xx for well-formed requests", result["server_errors_well_formed"]),
        ("wrong answers (≠ solo answer)", result["wrong_answers"]),
        ("abusive requests (5xx among them)", f"{result['abusive_requests']} ({result['abusive_5xx']})"),
        ("disconnecting clients' requests", sum(result["disconnects"].values())),
        ("server RSS start → end", f"{result['rss_start_mb']} → {result['rss_end_mb']} MB"),
        ("latency p50 / p99 (normal)", f"{result['p50_ms']} / {result['p99_ms']} ms"),
        ("open rows once idle", result["open_rows_after"]),
        ("solo answers after the soak", result["solo_answers_after"]),
    ]
    lines = [f"Soak, {meta['date']}: `{meta['command']}` ({meta['machine']}).", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--abusive", type=float, default=0.15, help="Share of abusive clients.")
    parser.add_argument("--disconnecting", type=float, default=0.15, help="Share of disconnecting clients.")
    parser.add_argument("--cases", type=int, default=48, help="Distinct well-formed requests (solo answers).")
    parser.add_argument("--mode", default="auto", help="The server's --mode.")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry = build(work, ADAPTERS, args.hidden, args.layers)
        process, url = start_server(registry, 64, True, work / "server.log", args.threads, args.mode,
                                    extra=["--api-key", API_KEY])
        try:
            result = asyncio.run(soak(int(url.rsplit(":", 1)[1]), process.pid, args))
        finally:
            stop_server(process)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
            "args": vars(args) | {"out": str(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
    table = markdown(result, meta)
    (args.out / "soak.md").write_text(table)
    print(table)
    for sample in result["samples"]:
        print("sample:", sample)


if __name__ == "__main__":
    main()
