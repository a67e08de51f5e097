"""``adapterhub serve``: option errors are refused before anything loads; a real server process answers,
logs JSON lines, and shuts down cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapterhub_local.cli import main
from adapterhub_local.registry import Registry


def never_serve(*args: object, **kwargs: object) -> None:
    raise AssertionError("the server started despite a refused option")


@pytest.mark.parametrize("extra", [["--mode", "fast"], ["--max-batch", "0"], ["--timeout", "0"],
                                   ["--protect-public"], ["--dtype", "int3"], ["--threads", "0"],
                                   ["--pool-mb", "0"], ["--decoder", "turbo"], ["--api-key", ""],
                                   ["--api-key", "   "], ["--api-key", " k"], ["--api-key", "\t"],
                                   ["--max-body-mb", "0"]])
def test_bad_options_are_refused(served_registry: Registry, extra: list[str], monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("uvicorn.run", never_serve)
    assert main(["--registry", str(served_registry.root), "serve", "--base", "tiny", *extra]) == 1
    assert "serve options" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", " ", "\n"])
def test_an_empty_key_from_the_environment_is_refused(served_registry: Registry, value: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADAPTERHUB_API_KEY", value)
    monkeypatch.setattr("uvicorn.run", never_serve)
    assert main(["--registry", str(served_registry.root), "serve", "--base", "tiny"]) == 1
    assert "API key" in capsys.readouterr().err


def test_unknown_base_is_refused(served_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--registry", str(served_registry.root), "serve", "--base", "nope"]) == 2
    assert "base add" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_process_answers_and_stops_gracefully(served_registry: Registry, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-c", "from adapterhub_local.cli import run; run()", "--registry",
               str(served_registry.root), "serve", "--base", "tiny", "--adapter", "lora1", "--port", str(port),
               "--api-key", "k", "--mode", "swap"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        adapters = httpx.get(f"{url}/admin/adapters", headers={"X-API-Key": "k"}).json()["adapters"]
        assert [a["ref"] for a in adapters] == ["lora1@1"]  # preloaded by --adapter
        out = httpx.post(f"{url}/v1/completions", json={"model": "lora1", "prompt": "hi", "max_tokens": 3},
                         timeout=60)
        assert out.status_code == 200, out.text
        process.send_signal(signal.SIGTERM)
        # uvicorn drains, runs the app's shutdown, then re-raises the signal it caught (exit -SIGTERM).
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [e["msg"] for e in events]
    assert messages.index("server ready") < messages.index("draining") < messages.index("stopped")
    assert "Application shutdown complete." in messages
    request = next(e for e in events if e["msg"] == "request" and e["path"] == "/v1/completions")
    assert request["status"] == 200 and request["model"] == "lora1@1" and request["ms"] > 0
