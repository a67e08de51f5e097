"""The registry commands through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub_local.cli import main
from tests.peft_factory import save_lora, save_prompt


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_full_registry_tour(capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    save_lora(tiny_llama_dir, tmp_path / "lora")
    save_prompt(tiny_llama_dir, tmp_path / "prompt")
    assert run(capsys, "-R", reg, "base", "add", "tiny", str(tiny_llama_dir))[0] == 0
    code, out, _ = run(capsys, "-R", reg, "base", "list", "--json")
    assert code == 0 and json.loads(out)[0]["architecture"] == "LlamaForCausalLM"
    assert run(capsys, "-R", reg, "import", str(tmp_path / "lora"), "--name", "qa", "--base", "tiny")[0] == 0
    assert run(capsys, "-R", reg, "import", str(tmp_path / "prompt"), "--name", "soft", "--base", "tiny")[0] == 0
    assert run(capsys, "-R", reg, "tag", "qa@1", "prod")[0] == 0
    code, out, _ = run(capsys, "-R", reg, "list", "--json")
    listing = {row["ref"]: row for row in json.loads(out)}
    assert set(listing) == {"qa@1", "soft@1"} and listing["qa@1"]["tags"] == ["prod"]
    code, out, _ = run(capsys, "-R", reg, "show", "qa:prod", "--json")
    assert json.loads(out)["rank"] == 4
    assert run(capsys, "-R", reg, "verify")[0] == 0
    assert run(capsys, "-R", reg, "export", "qa", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out/adapter_model.safetensors").exists()
    assert run(capsys, "-R", reg, "index", "rebuild")[0] == 0
    assert run(capsys, "-R", reg, "delete", "soft@1", "--yes")[0] == 0
    code, out, _ = run(capsys, "-R", reg, "list", "--json")
    assert [row["ref"] for row in json.loads(out)] == ["qa@1"]


def test_verify_names_damaged_file_and_exits_nonzero(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    reg = tmp_path / "reg"
    save_lora(tiny_llama_dir, tmp_path / "lora")
    run(capsys, "-R", str(reg), "base", "add", "tiny", str(tiny_llama_dir))
    run(capsys, "-R", str(reg), "import", str(tmp_path / "lora"), "--name", "qa", "--base", "tiny")
    weights = reg / "adapters/qa/1/adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "-R", str(reg), "verify")
    assert code == 3 and "qa@1: adapter_model.safetensors" in out and "1 problem" in err


def _one_line_error(env: dict[str, str], args: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "adapterhub_local", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    from adapterhub_local.registry import Registry

    env = {**os.environ, "ADAPTERHUB_HOME": str(tmp_path / "home"), "COLUMNS": "400"}
    Registry.create(tmp_path / "home")
    for args, needle in [
        (["show", "../x"], "invalid adapter name '../x'"),
        (["show", "nothing"], "adapter 'nothing' is not registered"),
        (["base", "add", "b", str(tmp_path / "missing")], "was not found"),
        (["import", str(tmp_path), "--name", "/etc/x", "--base", "b"], "invalid adapter name '/etc/x'"),
    ]:
        _one_line_error(env, args, needle)
