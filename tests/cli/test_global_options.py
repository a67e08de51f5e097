"""Global options (``--registry``/``-R``, ``--verbose``/``-v``, ``--threads``) work before and after the
subcommand, in both spellings, and an option a subcommand declares itself stays with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer

from adapterhub_local.cli.common import app, hoist_global_options
from adapterhub_local.registry import Registry
from tests.cli.tiny import run
from tests.conftest import make_tiny_llama


@pytest.fixture
def two_registries(tmp_path: Path) -> tuple[Path, Path]:
    """``full`` holds a base named ``tiny``; ``empty`` holds nothing."""
    full = Registry(tmp_path / "full")
    full.add_base("tiny", str(make_tiny_llama(tmp_path / "tiny")))
    empty = tmp_path / "empty"
    Registry(empty)
    return full.root, empty


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("placement", ["before", "after", "after-equals", "short-after"])
def test_registry_is_accepted_anywhere(two_registries: tuple[Path, Path], placement: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    full, empty = two_registries
    argvs: dict[str, list[str | Path]] = {"before": ["--registry", full, "base", "list", "--json"],
                                          "after": ["base", "list", "--json", "--registry", full],
                                          "after-equals": ["base", "list", f"--registry={full}", "--json"],
                                          "short-after": ["base", "list", "-R", full, "--json"]}
    argv = argvs[placement]
    result = run(capsys, *argv)
    assert result.code == 0, result.err
    assert [b["name"] for b in result.json()] == ["tiny"]
    # The last one given wins, as for any option: the subcommand position does not matter.
    assert run(capsys, "-R", full, "base", "list", "--json", "-R", empty).json() == []


@pytest.mark.parametrize("argv", [["--threads", "1", "base", "list"], ["base", "list", "--threads", "1"],
                                  ["base", "list", "--threads=1"]])
def test_threads_anywhere_sets_torch_threads(two_registries: tuple[Path, Path], argv: list[str], threads: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    assert run(capsys, *argv, "-R", two_registries[0]).code == 0
    assert torch.get_num_threads() == 1


def test_threads_goes_through_runtime_configure_threads(two_registries: tuple[Path, Path], threads: None,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[int | None] = []

    def configure_threads(n: int | None = None) -> int:
        seen.append(n)
        return 1

    monkeypatch.setattr("adapterhub_local.runtime.configure_threads", configure_threads)
    run(capsys, "base", "list", "--threads", "3", "-R", two_registries[0])
    run(capsys, "base", "list", "-R", two_registries[0])  # no option: the environment decides
    assert seen == [3, None]


@pytest.mark.parametrize("argv", [["base", "list", "--threads", "0"], ["--threads", "x", "base", "list"]])
def test_bad_thread_counts_are_one_line_errors(argv: list[str], two_registries: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, *argv, "-R", two_registries[0])
    assert result.code != 0 and len(result.err.strip().splitlines()) == 1 and "--threads" in result.err


def test_bad_thread_environment_is_one_readable_line(two_registries: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADAPTERHUB_THREADS", "many")
    result = run(capsys, "base", "list", "-R", two_registries[0])
    assert result.code != 0
    assert result.err.strip().splitlines() == [
        "error: invalid environment: 1 problem(s): $ADAPTERHUB_THREADS='many' is not an integer — "
        "set ADAPTERHUB_THREADS to a thread count such as 2, or unset it"]


@pytest.mark.parametrize("flag_first", [True, False])
def test_verbose_anywhere_shows_the_traceback_of_an_unexpected_error(flag_first: bool,
                                                                     two_registries: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def broken(self: Registry) -> list[object]:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(Registry, "list_bases", broken)
    quiet = run(capsys, "base", "list", "-R", two_registries[0])
    assert quiet.code == 1
    assert quiet.err.strip().splitlines() == [
        "error: RuntimeError: disk on fire second line — run again with --verbose for the traceback"]
    argv = ["-v", "base", "list"] if flag_first else ["base", "list", "--verbose"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(capsys, *argv, "-R", two_registries[0])


def test_hoisting_keeps_a_subcommands_own_options_and_stops_at_double_dash() -> None:
    group = typer.main.get_command(app)
    assert hoist_global_options(["list", "--threads", "2", "-R", "r"], group) == \
        ["--threads", "2", "-R", "r", "list"]
    # serve declares --threads itself: it stays there.
    assert hoist_global_options(["serve", "--base", "b", "--threads", "2", "-R", "r"], group) == \
        ["-R", "r", "serve", "--base", "b", "--threads", "2"]
    assert hoist_global_options(["generate", "x", "--", "-R"], group) == ["generate", "x", "--", "-R"]
    assert hoist_global_options(["base", "list", "-v"], group) == ["-v", "base", "list"]
