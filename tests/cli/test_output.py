"""What the command line prints: one line per error, user data escaped in tables, names that never wrap, a
readable ``show``, quiet model loading unless ``--verbose``, and progress lines (not bars) in logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub_local.cli import main
from adapterhub_local.cli.common import cell
from adapterhub_local.registry import CardInfo, Registry
from tests.cli.tiny import World, make_world, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    made = make_world(tmp_path_factory.mktemp("output"))
    assert main(["-R", made.reg, "train", str(made.gen_recipe), "--json", "--no-progress"]) == 0
    return made


@pytest.mark.parametrize("argv", [
    ["generate"],
    ["list", "--bogus"],
    ["show", "nope"],
    ["show", "../escape"],
    ["train", "no-such-recipe.yaml"],
    ["train", "{gen_recipe}", "method.r=0", "train.colour=red"],
    ["train", "{gen_recipe}", "not-a-pair"],
    ["generate", "tgen", "x", "-n", "many"],
    ["generate", "tgen", "x", "--top-p", "7"],
    ["eval", "tgen", "--data", "missing.jsonl"],
    ["merge", "tgen"],
    ["base", "add", "x", "/no/such/dir"],
    ["nonsense"],
])
def test_every_error_is_one_line(world: World, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, *[a.format(gen_recipe=world.gen_recipe) for a in argv], "-R", world.reg)
    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ") and "Traceback" not in result.err


def test_user_data_in_tables_is_shown_literally(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "train", world.gen_recipe, "--no-progress", "-R", world.reg)
    assert result.code == 0, result.err
    # The sample table's prompts: brackets are data, not markup.
    assert "area[riverside]" in result.out and "price[cheap]" in result.out
    for text in ("area[riverside]", "[bold]loud[/bold]", "[/]", "a\\[b]"):
        assert cell(text) != text or "[" not in text
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(cell("area[riverside] [bold]loud[/bold] [/]"))
    assert console.export_text().strip() == "area[riverside] [bold]loud[/bold] [/]"


def test_names_never_wrap_in_listings(world: World, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    long_name = "e2e-smollm2-lora-sweep-alpha-proportional-r1024-seed0"
    run_dir = Path(str(world.registry.resolve("tgen@1").extra["run_dir"]))
    world.registry.register_adapter(long_name, run_dir / "adapter", "tllama", CardInfo(task="e2e"))
    monkeypatch.setenv("COLUMNS", "80")
    result = run(capsys, "list", "-R", world.reg)
    assert result.code == 0
    assert f"{long_name}@1" in result.out
    bases = run(capsys, "base", "list", "-R", world.reg)
    assert "tllama" in bases.out and "tbert" in bases.out


def test_listings_in_a_log_keep_each_version_on_one_line(world: World, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # a log: not a terminal, 80 columns
    result = run(capsys, "list", "-R", world.reg)
    assert result.code == 0
    card = world.registry.resolve("tgen@1")
    rows = [line for line in result.out.splitlines() if "tgen@1" in line]
    assert len(rows) == 1
    for value in (str(card.task), card.base, card.created[:19]):  # no short column folded onto a second line
        assert value in rows[0], (value, result.out)


def test_show_prints_the_recipe_as_yaml(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "show", "tgen@1", "-R", world.reg)
    assert result.code == 0
    assert "{'" not in result.out and "': " not in result.out  # no Python dict reprs
    assert "type: generation" in result.out and "max_steps: 4" in result.out
    assert "template: 'restaurant : {mr} .'" in result.out or "template: restaurant : {mr} ." in result.out


def test_verbose_shows_the_load_report_that_is_quiet_by_default(world: World, capfd: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    argv = ["-R", world.reg, "train", str(world.cls_recipe), "--json", "--no-progress", "train.max_steps=2"]
    assert main([*argv, "--verbose"]) == 0
    shown = capfd.readouterr().err + caplog.text  # pytest takes log records into caplog
    assert "LOAD REPORT" in shown and "Loading weights" in shown
    caplog.clear()
    assert main(argv) == 0
    quiet = capfd.readouterr().err + caplog.text
    assert "LOAD REPORT" not in quiet and "Loading weights" not in quiet


def test_a_logged_train_run_is_quiet_and_reports_progress_in_plain_lines(world: World) -> None:
    """A real process with its output in a file (not a TTY), as `adapterhub train ... > log 2>&1` runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    log = world.root / "train.log"
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "adapterhub_local", "train", str(world.cls_recipe),
                               "train.max_steps=3", "-R", world.reg], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, check=False, timeout=300).returncode
    text = log.read_bytes().decode()  # bytes: read_text() would turn "\r" into "\n"
    assert code == 0, text
    assert "train: step 1/3" in text and "train: step 3/3 (100.0%)" in text
    for noise in ("\r", "LOAD REPORT", "Warning", "warn(", "Loading weights", "Writing model shards"):
        assert noise not in text, noise


def test_a_logged_sweep_has_no_progress_bars(world: World) -> None:
    """`adapterhub sweep ... > log 2>&1` (nohup): the per-rank training draws no carriage-return bars."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    log = world.root / "sweep.log"
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "adapterhub_local", "sweep", str(world.cls_recipe), "--ranks",
                               "1,2", "train.max_steps=2", "-R", world.reg], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, check=False, timeout=300).returncode
    text = log.read_bytes().decode()
    assert code == 0, text
    assert "training r=2" in text and "report:" in text
    assert "\r" not in text


def test_library_progress_bars_stay_out_of_logs(tmp_path: Path) -> None:
    """Libraries that draw their own tqdm bars (transformers' GGUF conversion) draw none when stderr is a log."""
    script = ("import adapterhub_local.cli\nfrom tqdm.auto import tqdm\n"
              "for _ in tqdm(range(3), desc='library-bar'):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "log"
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-c", script], stdout=handle, stderr=subprocess.STDOUT, env=env,
                       check=True, timeout=120)
    assert "library-bar" not in log.read_text()
    with log.open("w") as handle:  # the same bar without the CLI's setting: the test can tell
        subprocess.run([sys.executable, "-c", script.replace("import adapterhub_local.cli\n", "")],
                       stdout=handle, stderr=subprocess.STDOUT, env=env, check=True, timeout=120)
    assert "library-bar" in log.read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_hub_retry_warnings_are_quiet_unless_verbose(verbose: bool, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub.utils import logging as hub_logging

    flags = ["--verbose"] if verbose else []
    Registry(tmp_path / "r")  # an existing registry: reading commands need not create one
    assert run(capsys, "base", "list", "-R", tmp_path / "r", *flags).code == 0
    hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    shown = capsys.readouterr().err + caplog.text
    assert ("Retrying" in shown) == verbose
