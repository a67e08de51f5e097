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
    assert json.loads(out)["rank"] == 4 and len(json.loads(out)["content_hash"]) == 64
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


# ------------------------------------------------------------------ issue 13, list 5
READING_COMMANDS = [["list"], ["list", "--tags"], ["show", "x"], ["verify"], ["export", "x", "OUT"], ["base", "list"],
                    ["base", "show", "b"], ["gc"], ["index", "rebuild"], ["tag", "x@1", "prod"], ["untag", "x", "prod"],
                    ["delete", "x@1", "--yes"], ["base", "remove", "b"]]


@pytest.mark.parametrize("args", READING_COMMANDS, ids=lambda a: "-".join(a))
def test_commands_that_only_read_or_change_never_create_a_registry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    missing = tmp_path / "regsitry-typo"
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    for position in ("before", "after"):
        argv = ["-R", str(missing), *args] if position == "before" else [*args[:1], *args[1:]]
        if position == "after":  # also through $ADAPTERHUB_HOME
            os.environ["ADAPTERHUB_HOME"] = str(missing)
        try:
            code, _out, err = run(capsys, *argv)
        finally:
            os.environ.pop("ADAPTERHUB_HOME", None)
        assert code == 2, err
        assert f"registry {missing} does not exist" in err and len(err.strip().splitlines()) == 1, err
        assert not missing.exists() and not (tmp_path / "out").exists()


def test_a_directory_that_is_not_a_registry_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/readme.txt").write_text("hi")
    code, _, err = run(capsys, "-R", str(tmp_path / "notes"), "list")
    assert code == 2 and "is not a registry" in err
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["readme.txt"]


def test_import_of_an_export_with_card_keeps_task_metrics_and_lineage(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from adapterhub_local.registry import CardInfo, Registry

    first = Registry(tmp_path / "one")
    first.add_base("tiny", str(tiny_llama_dir))
    save_lora(tiny_llama_dir, tmp_path / "lora")
    info = CardInfo(task="sentiment", task_type="causal_lm", metrics={"accuracy": 0.91, "bleu": 12.5},
                    parent="seed@3", dataset_fingerprint="f" * 64, recipe={"lr": 0.001, "steps": 20},
                    labels=["neg", "pos"], training={"wall_s": 12.0}, extra={"pooling": "mean"})
    first.register_adapter("sent", tmp_path / "lora", "tiny", info)
    assert run(capsys, "-R", str(first.root), "export", "sent", str(tmp_path / "exp"), "--with-card")[0] == 0
    second = str(tmp_path / "two")
    assert run(capsys, "-R", second, "base", "add", "tiny", str(tiny_llama_dir))[0] == 0
    code, _, err = run(capsys, "-R", second, "import", str(tmp_path / "exp"), "--name", "copy", "--base", "tiny")
    assert code == 0, err
    code, out, _ = run(capsys, "-R", second, "show", "copy", "--json")
    shown = json.loads(out)
    for key in ("task", "task_type", "metrics", "parent", "dataset_fingerprint", "recipe", "labels", "training",
                "extra"):
        assert shown[key] == getattr(info, key), key
    assert shown["source"] == str(tmp_path / "exp") and shown["files"] == first.resolve("sent").files
    # a flag given on the command line wins over the card's value
    run(capsys, "-R", second, "import", str(tmp_path / "exp"), "--name", "copy", "--base", "tiny", "--task", "other")
    assert json.loads(run(capsys, "-R", second, "show", "copy@2", "--json")[1])["task"] == "other"


def test_wrong_base_import_names_both_bases_with_fingerprints(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from adapterhub_local.registry import Registry
    from tests.conftest import make_tiny_llama

    reg = Registry(tmp_path / "reg")
    tiny = reg.add_base("tiny", str(tiny_llama_dir))
    same_shape = reg.add_base("twin", str(make_tiny_llama(tmp_path / "twin", seed=5)))
    wide = reg.add_base("wide", str(make_tiny_llama(tmp_path / "wide", hidden=64)))
    save_lora(tiny_llama_dir, tmp_path / "lora")
    reg.register_adapter("a", tmp_path / "lora", "tiny")
    run(capsys, "-R", str(reg.root), "export", "a", str(tmp_path / "exp"), "--with-card")
    # with a card: the base it was made on (by fingerprint) vs the base given
    code, _, err = run(capsys, "-R", str(reg.root), "import", str(tmp_path / "exp"), "--name", "b", "--base", "twin")
    assert code != 0 and len(err.strip().splitlines()) == 1
    for needle in ("'tiny'", tiny.short, "'twin'", same_shape.short, "--base tiny"):
        assert needle in err, (needle, err)
    # a plain PEFT directory: the given base and the base(s) it does fit
    code, _, err = run(capsys, "-R", str(reg.root), "import", str(tmp_path / "lora"), "--name", "b", "--base", "wide")
    assert code != 0 and len(err.strip().splitlines()) == 1
    for needle in ("base 'wide'", wide.short, "it fits base 'tiny'", tiny.short, "base 'twin'"):
        assert needle in err, (needle, err)
    assert reg.versions_on_disk("b") == []


def test_pull_without_network_fails_in_one_line_without_retries(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from adapterhub_local.registry import Registry

    Registry(tmp_path / "reg").add_base("tiny", str(tiny_llama_dir))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "COLUMNS": "400"}  # nothing listens on port 9
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)  # huggingface_hub reads either as "offline"
    proc = subprocess.run([sys.executable, "-m", "adapterhub_local", "-R", str(tmp_path / "reg"), "pull", "me/x",
                           "--name", "x", "--base", "tiny"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line, no retry log
    assert "cannot reach http://127.0.0.1:9" in proc.stderr and "Retry" not in proc.stderr + proc.stdout
