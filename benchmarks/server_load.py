"""Server load: requests/s and p50/p95 latency at 1, 8 and 64 concurrent clients with 1 and 16 adapters,
for four servers in one run on the same machine: continuous (token-level) batching, dynamic batching
(``--no-continuous``: a batch forms in a short window and decodes to completion), one request at a
time (``--max-batch 1 --no-continuous``, the baseline), all in swap mode, and the default ``--mode auto``
(continuous while its policy swaps, merged and dynamically batched when one adapter carries the traffic).

Each server is a real ``adapterhub serve`` process on 127.0.0.1; clients are asyncio tasks in
this process (one keep-alive connection each), each sending its requests back to back (closed loop),
greedy, with mixed ``max_tokens`` (``--tokens``, cycled over the requests) so that short requests share
batches with long ones: that is where continuous batching returns early finishers at once while dynamic
batching holds them until the batch's longest row is done ("short p50" is the median latency of the
requests with the smallest ``max_tokens``). Every adapter is warmed up first, so cold loads are not
measured. The model is a small random-weight Llama
built on the spot (no downloads), so the figures measure serving overhead and batching, not quality.

    .venv/bin/python benchmarks/server_load.py                 # CPU defaults, a few minutes
    .venv/bin/python benchmarks/server_load.py --hidden 256 --layers 4 --tokens 8 32 --per-client 4

Writes ``benchmarks/results/server_load.json`` and ``.md`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub_local.registry import Registry  # noqa: E402
from tests.server.assets import add_loras, make_chat_base  # noqa: E402


@dataclass
class Scenario:
    server: str  # "continuous" | "dynamic" | "one-at-a-time"
    clients: int
    adapters: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    errors: int
    tokens_per_s: float
    mean_batch: float
    """Mean rows per engine batch during the scenario (from the server's /metrics; for continuous batching,
    the rows decoding together right after each admission)."""
    short_p50_ms: float
    """Median latency of the requests with the smallest ``max_tokens``."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def batch_totals(url: str) -> tuple[float, float]:
    """(rows, batches) so far, from the server's batch-size histogram."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("adapterhub_batch_size_sum", "adapterhub_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values.get("adapterhub_batch_size_sum", 0.0), values.get("adapterhub_batch_size_count", 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(registry: Path, max_batch: int, continuous: bool, log: Path, threads: int, mode: str = "swap",
                 extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-c", "from adapterhub_local.cli import run; run()", "--registry", str(registry),
               "serve", "--base", "bench", "--port", str(port), "--mode", mode, "--max-batch", str(max_batch),
               "--continuous" if continuous else "--no-continuous",
               "--log-level", "warning", "--threads", str(threads), *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start in 180 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


class Connection:
    """A minimal HTTP/1.1 keep-alive client (one connection per simulated client). ``httpx`` costs about
    ten times more CPU per request, which on a small machine would measure the load generator instead of
    the server."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_load(url: str, names: list[str], clients: int, per_client: int, tokens: list[int],
                   prompt: str) -> tuple[list[tuple[int, float]], int, int, float]:
    """Returns ``(max_tokens, seconds)`` per request, errors, generated tokens and wall time."""
    latencies: list[tuple[int, float]] = []
    errors = 0
    generated = 0

    async def one_client(c: int) -> None:
        nonlocal errors, generated
        connection = Connection(url)
        try:
            for i in range(per_client):
                n = c * per_client + i
                max_tokens = tokens[(c + i) % len(tokens)]
                body = {"model": names[n % len(names)], "prompt": f"{prompt} {c}.{i}",
                        "max_tokens": max_tokens, "temperature": 0}
                started = time.perf_counter()
                status, answer = await connection.post("/v1/completions", body)
                latencies.append((max_tokens, time.perf_counter() - started))
                if status != 200:
                    errors += 1
                else:
                    usage = answer["usage"]
                    assert isinstance(usage, dict)
                    generated += int(usage["completion_tokens"])
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return latencies, errors, generated, time.perf_counter() - started


def build(work: Path, adapters: int, hidden: int, layers: int) -> Path:
    registry = Registry(work / "registry")
    registry.add_base("bench", str(make_chat_base(work / "base", hidden=hidden, layers=layers, context=512)))
    add_loras(registry, "bench", work, adapters)
    return registry.root


def markdown(rows: list[Scenario], meta: dict[str, object]) -> str:
    by_key = {(r.server, r.clients, r.adapters): r for r in rows}
    lines = [
        "# Server load: continuous vs dynamic batching vs one request at a time",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: random Llama, hidden {meta['hidden']}, {meta['layers']} layers; max_tokens cycled over "
        f"{meta['tokens']} per request, greedy; {meta['per_client']} requests per client (at least "
        f"{meta['min_requests']} per scenario) in each of {meta['rounds']} interleaved rounds; server torch "
        f"threads {meta['threads']}; machine: {meta['machine']}, load average {meta['load_average_1m']} at the "
        "end (other jobs share it).",
        "",
        "req/s: the median round's; latency (ms, whole request) over all rounds' requests; *short p50*: median "
        "latency of the requests with the smallest max_tokens; *cont/dyn*, *dyn/1*: req/s ratios; *batch*: mean "
        "rows per engine batch (continuous: rows decoding together after each admission).",
        "",
        "*auto*: the default `serve --mode auto` (continuous while its policy swaps; one adapter carrying nearly "
        "all traffic is merged and batched dynamically); the others run `--mode swap`.",
        "",
        "| clients | adapters | req/s cont / dyn / 1-at-a-time | cont/dyn | dyn/1 | p50 ms cont / dyn / 1 | "
        "p95 ms cont / dyn / 1 | short p50 ms cont / dyn / 1 | batch cont / dyn | auto: req/s, p50, short p50 | "
        "errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in meta["clients"]:  # type: ignore[attr-defined]
        for adapters in meta["adapter_counts"]:  # type: ignore[attr-defined]
            c = by_key[("continuous", clients, adapters)]
            d = by_key[("dynamic", clients, adapters)]
            s = by_key[("one-at-a-time", clients, adapters)]
            a = by_key[("auto", clients, adapters)]
            lines.append(f"| {clients} | {adapters} | {c.rps:.1f} / {d.rps:.1f} / {s.rps:.1f} | "
                         f"{c.rps / d.rps:.2f}× | {d.rps / s.rps:.2f}× | "
                         f"{c.p50_ms:.0f} / {d.p50_ms:.0f} / {s.p50_ms:.0f} | "
                         f"{c.p95_ms:.0f} / {d.p95_ms:.0f} / {s.p95_ms:.0f} | "
                         f"{c.short_p50_ms:.0f} / {d.short_p50_ms:.0f} / {s.short_p50_ms:.0f} | "
                         f"{c.mean_batch:.1f} / {d.mean_batch:.1f} | "
                         f"{a.rps:.1f}, {a.p50_ms:.0f}, {a.short_p50_ms:.0f} | "
                         f"{c.errors + d.errors + s.errors + a.errors} |")
    return "\n".join(lines) + "\n"


@dataclass
class Round:
    """One server's share of one round of a scenario."""

    latencies: list[tuple[int, float]]
    errors: int
    generated: int
    wall: float
    rows: float
    batches: float


def measure_round(url: str, names: list[str], clients: int, args: argparse.Namespace) -> Round:
    per_client = max(args.per_client, -(-args.min_requests // clients))
    rows_before, batches_before = batch_totals(url)
    latencies, errors, generated, wall = asyncio.run(
        run_load(url, names, clients, per_client, args.tokens, "Benchmark prompt"))
    rows_after, batches_after = batch_totals(url)
    return Round(latencies, errors, generated, wall, rows_after - rows_before, batches_after - batches_before)


def summarise(server: str, names: list[str], clients: int, rounds: list[Round], args: argparse.Namespace) -> Scenario:
    """Pool the rounds: latency percentiles over every request, req/s the median round's (the machine is
    shared, so one slow round from outside load does not decide a figure)."""
    latencies = [x for r in rounds for x in r.latencies]
    wall = sum(r.wall for r in rounds)
    errors = sum(r.errors for r in rounds)
    generated = sum(r.generated for r in rounds)
    rows_run, batches = sum(r.rows for r in rounds), sum(r.batches for r in rounds)
    seconds = [t for _, t in latencies]
    short = [t for n, t in latencies if n == min(args.tokens)]
    row = Scenario(server=server, clients=clients, adapters=len(names), requests=len(latencies),
                   seconds=round(wall, 3), rps=statistics.median(len(r.latencies) / r.wall for r in rounds),
                   p50_ms=1000 * statistics.median(seconds),
                   p95_ms=1000 * percentile(seconds, 0.95), errors=errors, tokens_per_s=generated / wall,
                   mean_batch=rows_run / max(1.0, batches),
                   short_p50_ms=1000 * statistics.median(short) if short else float("nan"))
    print(f"{server:>14} clients={clients:>3} adapters={len(names):>2} {row.rps:7.1f} req/s "
          f"p50 {row.p50_ms:7.1f} ms p95 {row.p95_ms:7.1f} ms short p50 {row.short_p50_ms:7.1f} ms "
          f"batch {row.mean_batch:5.1f} errors {errors}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--per-client", type=int, default=3, help="Requests each client sends.")
    parser.add_argument("--min-requests", type=int, default=24, help="At least this many requests per scenario.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 16, 48],
                        help="max_tokens values, cycled over the requests (mixed lengths).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per scenario and server.")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=64, help="The batching servers' --max-batch.")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads in the server process.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    rows: list[Scenario] = []
    servers = {"continuous": (args.max_batch, True, "swap"), "dynamic": (args.max_batch, False, "swap"),
               "one-at-a-time": (1, False, "swap"), "auto": (args.max_batch, True, "auto")}
    with tempfile.TemporaryDirectory(prefix="server-load-") as tmp:
        work = Path(tmp)
        registry = build(work, max(args.adapters), args.hidden, args.layers)
        names = [f"lora{i}" for i in range(max(args.adapters))]
        # Both servers run for the whole benchmark (an idle one uses no CPU) and each scenario is measured
        # on one right after the other, so both see the same machine load.
        urls: dict[str, str] = {}
        processes = []
        try:
            for server, (max_batch, continuous, mode) in servers.items():
                process, urls[server] = start_server(registry, max_batch, continuous, work / f"{server}.log",
                                                     args.threads, mode)
                processes.append(process)
                asyncio.run(run_load(urls[server], names, len(names), 1, [2], "warm up"))  # load every adapter
            for clients in args.clients:
                for adapters in args.adapters:
                    # Rounds interleave the servers (in a rotating order), so outside load hits all of them alike.
                    rounds: dict[str, list[Round]] = {server: [] for server in urls}
                    order = list(urls)
                    for k in range(args.rounds):
                        for server in order[k % len(order):] + order[:k % len(order)]:
                            rounds[server].append(measure_round(urls[server], names[:adapters], clients, args))
                    for server in urls:
                        rows.append(summarise(server, names[:adapters], clients, rounds[server], args))
        finally:
            for process in processes:
                stop_server(process)

    meta: dict[str, object] = {
        "command": " ".join(["python benchmarks/server_load.py", *sys.argv[1:]]),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "hidden": args.hidden, "layers": args.layers, "tokens": args.tokens, "per_client": args.per_client,
        "rounds": args.rounds,
        "min_requests": args.min_requests,
        "clients": args.clients, "adapter_counts": args.adapters, "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                   f"{platform.python_version()}",
    }
    def rps(server: str, c: int, a: int) -> float:
        return next(r.rps for r in rows if (r.server, r.clients, r.adapters) == (server, c, a))

    ratios = {f"{c}x{a}": {"continuous/one-at-a-time": rps("continuous", c, a) / rps("one-at-a-time", c, a),
                           "dynamic/one-at-a-time": rps("dynamic", c, a) / rps("one-at-a-time", c, a),
                           "continuous/dynamic": rps("continuous", c, a) / rps("dynamic", c, a),
                           "auto/continuous": rps("auto", c, a) / rps("continuous", c, a)}
              for c in args.clients for a in args.adapters}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_load.json").write_text(json.dumps(
        {"meta": meta, "scenarios": [asdict(r) for r in rows], "speedup_rps": ratios}, indent=2) + "\n")
    table = markdown(rows, meta)
    (args.out / "server_load.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
