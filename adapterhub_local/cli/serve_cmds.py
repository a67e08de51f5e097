"""``adapterhub serve``: the OpenAI-compatible HTTP server over one base and its adapters (uvicorn)."""

from __future__ import annotations

import os
from typing import cast

import typer

from adapterhub_local import runtime
from adapterhub_local.cli.common import app, get_registry
from adapterhub_local.errors import ConfigError
from adapterhub_local.inference.static_decode import DECODERS
from adapterhub_local.runtime import configure_threads, requested_threads

MODES = ("merge", "swap", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@app.command("serve")
def serve(
    base: str = typer.Option(..., "--base", "-b", help="Registered base model to serve."),
    adapter: list[str] = typer.Option([], "--adapter", "-a", help="Adapter reference to load at start (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="ADAPTERHUB_API_KEY",
                                       help="Key for admin endpoints (default: $ADAPTERHUB_API_KEY)."),
    protect_public: bool = typer.Option(False, "--protect-public", help="Require the key on /v1/* as well."),
    mode: str = typer.Option("auto", help="merge | swap | auto."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto (bfloat16 where the device "
                              "multiplies it natively: GPUs, CPUs with AMX or AVX512-BF16; else float32)."),
    pool_mb: int = typer.Option(256, help="Device memory for resident adapters (MiB; LRU beyond it)."),
    decoder: str = typer.Option("auto", help="auto | dynamic | static | graph: how batches decode (auto: CUDA graphs "
                                             "of a static-cache step on cuda, the dynamic cache elsewhere)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's; fewer helps a busy CPU)."),
    max_batch: int = typer.Option(64, help="Most requests in one engine batch."),
    window_ms: float = typer.Option(4.0, help="How long an idle engine waits for a batch to fill (ms)."),
    continuous: bool = typer.Option(True, "--continuous/--no-continuous",
                                    help="Token-level batching (swap mode, auto mode while it swaps): requests "
                                         "join the running batch at the next step and return when done (off: "
                                         "dynamic batching)."),
    timeout: float = typer.Option(300.0, help="Per-request timeout in seconds (504 after it)."),
    drain: float = typer.Option(30.0, help="Seconds queued work may still run on shutdown."),
    max_body_mb: float = typer.Option(2.0, help="Largest request body read (MiB); 413 beyond it."),
    metrics_top_k: int = typer.Option(20, help="Adapters named in per-adapter metrics and stats (the most traffic; "
                                                "the rest are summed as 'other')."),
    log_level: str = typer.Option("info", help="debug | info | warning | error."),
) -> None:
    """Serve the base and its registered adapters over an OpenAI-compatible API (per-request adapters)."""
    from adapterhub_local.server.auth import key_problems

    problems = []
    if mode not in MODES:
        problems.append(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if threads is not None and threads < 1:
        problems.append("--threads must be at least 1")
    if decoder not in DECODERS:
        problems.append(f"--decoder {decoder!r} is not one of {', '.join(DECODERS)}")
    if pool_mb < 1:
        problems.append("--pool-mb must be at least 1")
    if max_batch < 1:
        problems.append("--max-batch must be at least 1")
    if window_ms < 0 or timeout <= 0 or drain < 0:
        problems.append("--window-ms and --drain must be >= 0 and --timeout > 0")
    if protect_public and api_key is None:
        problems.append("--protect-public needs --api-key")
    problems += [f"--api-key: {p}" for p in key_problems(api_key)]
    if api_key is None and os.environ.get("ADAPTERHUB_API_KEY") is not None:  # typer reads an empty one as unset
        problems.append("the API key in $ADAPTERHUB_API_KEY is empty (unset it to run without a key, or give a key)")
    if max_body_mb <= 0:
        problems.append("--max-body-mb must be > 0")
    if metrics_top_k < 0:
        problems.append("--metrics-top-k must be >= 0")
    if problems:
        raise ConfigError(problems, "fix the listed options", what="serve options")

    import torch
    import uvicorn

    from adapterhub_local.inference.engine import Engine
    from adapterhub_local.server import ServerConfig, create_app, logs
    from adapterhub_local.server.auth import AuthConfig
    from adapterhub_local.server.backend import Mode
    from adapterhub_local.server.scheduler import SchedulerConfig

    logs.configure(log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    registry = get_registry()
    registry.base(base)  # a clear error before loading anything
    # serve's own --threads, else the global --threads / $ADAPTERHUB_THREADS, else the usable-CPU default
    configure_threads(threads if threads is not None else requested_threads())
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = runtime.base_dtype("auto", chosen) if dtype == "auto" else getattr(torch, dtype)
    engine = Engine(registry, base, mode=cast(Mode, mode), device=chosen, pool_bytes=pool_mb << 20,
                    dtype=weights, decoder=decoder)
    for ref in adapter:
        engine.load(ref)
    config = ServerConfig(
        auth=AuthConfig(api_key=api_key, protect_public=protect_public),
        scheduler=SchedulerConfig(window_ms=window_ms, max_batch=max_batch, timeout_s=timeout, drain_s=drain,
                                  continuous=continuous),
        max_body_bytes=int(max_body_mb * (1 << 20)),
        metrics_top_k=metrics_top_k,
    )
    server_app = create_app(engine, registry, base, config)
    uvicorn.run(server_app, host=host, port=port, log_config=None, timeout_graceful_shutdown=int(drain) + 5)
