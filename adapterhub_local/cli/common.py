"""Shared CLI plumbing: the typer app and its global options, rich output, ``--json``, and the checks every
command shares (device names, output directories, ``key=value`` overrides).

Command modules (``registry_cmds``, ``train_cmds`` …) import ``app`` from here and register their
commands on it; they parse arguments and call into the layers below, with no logic of their own.

Global options (``--registry``, ``--verbose``, ``--threads``) are declared once, on the app's callback;
:func:`hoist_global_options` lets them stand after the subcommand too (``adapterhub list -R reg``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterhub_local.errors import AlreadyExistsError, ConfigError, UnsupportedError
from adapterhub_local.registry.objectstore import is_remote
from adapterhub_local.registry.store import HOME_ENV, Registry

app = typer.Typer(
    name="adapterhub",
    help="Local platform for PEFT adapters: registry, training, rank sweeps, multi-adapter serving. "
         "Global options (--registry, --verbose, --threads) go before or after the subcommand.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

_state: dict[str, Any] = {"registry": None, "verbose": False}

GLOBAL_OPTIONS = {"--registry": True, "-R": True, "--verbose": False, "-v": False, "--threads": True}
"""The app's own options: name → whether it takes a value."""


@app.callback()
def _global_options(
    registry: str | None = typer.Option(
        None, "--registry", "-R", help="Registry directory or s3://bucket/prefix (default: $ADAPTERHUB_HOME or "
        "./registry)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show library load reports, warnings and full tracebacks."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="torch CPU threads (default: $ADAPTERHUB_THREADS, else torch's)."),
) -> None:
    from adapterhub_local.runtime import configure_threads

    _state["registry"] = registry
    _state["verbose"] = verbose
    configure_output(verbose)
    configure_threads(threads)


def verbose() -> bool:
    """Whether ``--verbose`` was given."""
    return bool(_state["verbose"])


def configure_output(verbose: bool) -> None:
    """Quiet library output unless ``verbose``: transformers' load reports, info logs and progress bars, the
    hub's progress bars and retry warnings, and deprecation/future warnings from the libraries we call.
    ``verbose`` restores the libraries' own defaults (warnings and load reports shown)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    # transformers reads the hub's switch when its logging module is first imported.
    (enable_progress_bars if verbose else disable_progress_bars)()
    # The hub logs each network retry as a warning; the command's own error says what failed, once.
    hub_logging.set_verbosity_warning() if verbose else hub_logging.set_verbosity_error()
    if not verbose:
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message=r".*(deprecated|will be removed).*")
    if "transformers" in sys.modules:  # already imported: its logging read the environment long ago
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning() if verbose else hf_logging.set_verbosity_error()
        hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()


def hoist_global_options(argv: list[str], group: Any) -> list[str]:
    """``argv`` with the global options moved in front of the subcommand, so they work in either place.

    An option the subcommand declares itself (``serve --threads``) stays with it; ``--`` ends the search.
    """
    front: list[str] = []
    rest: list[str] = []
    command: Any = group
    own: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest.extend(argv[i:])
            break
        name, has_value, _ = token.partition("=")
        if name in GLOBAL_OPTIONS and name not in own:
            width = 2 if GLOBAL_OPTIONS[name] and not has_value else 1
            front.extend(argv[i:i + width])
            i += width
            continue
        rest.append(token)
        if hasattr(command, "get_command") and not token.startswith("-"):
            sub = command.get_command(command.context_class(command), token)
            if sub is not None:
                command = sub
                own = {opt for param in sub.params for opt in (*param.opts, *param.secondary_opts)}
        i += 1
    return front + rest


def get_registry(create: bool = False) -> Registry:
    """The registry chosen by ``--registry`` / ``$ADAPTERHUB_HOME`` / ``./registry``. Only commands that
    add to it (base add, import, pull, train, sweep) pass ``create=True``; every other command refuses a
    path that holds no registry instead of creating an empty one. ``s3://bucket/prefix`` (there or in
    ``$ADAPTERHUB_HOME``) opens a registry on object storage, read through a local cache."""
    location = _state["registry"] or os.environ.get(HOME_ENV) or None
    if is_remote(location):
        from adapterhub_local.registry.objectstore import ObjectStoreRegistry

        return ObjectStoreRegistry(str(location), create=create)
    return Registry(location, create=create)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (no colour, no wrapping)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def cell(value: Any) -> str:
    """A table cell: user data escaped (``area[riverside]`` stays visible), mappings as YAML, flat lists
    comma-separated, ``None`` empty."""
    if value is None:
        return ""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value)):
        text = yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
        return escape(text.rstrip("\n"))
    if isinstance(value, list | tuple):
        return escape(", ".join(str(v) for v in value))
    return escape(str(value))


LOG_TABLE_WIDTH = 200
UNBOUNDED_WIDTH = 100_000
"""Width to measure a table at, so its true minimum and natural widths are not clamped to the screen's."""
"""Widest a table is printed when the output is not a terminal (so short columns never fold in logs)."""


def table(title: str | None, columns: list[str], rows: list[list[Any]], key_columns: int = 1) -> None:
    """Print a rich table. The first ``key_columns`` columns (names, references) never wrap; the table is
    printed wider than the terminal rather than fold them, and in logs as wide as its rows need."""
    out = Table(title=escape(title) if title else None, show_lines=False)
    for i, column in enumerate(columns):
        if i < key_columns:
            out.add_column(escape(column), no_wrap=True)
        else:
            out.add_column(escape(column), overflow="fold")
    for row in rows:
        out.add_row(*[cell(v) for v in row])
    measured = console.measure(out, options=console.options.update(max_width=UNBOUNDED_WIDTH))
    # On a terminal, fit the screen (folding all but the key columns); in a log or a pipe, where nobody
    # reads at 80 columns, print each row on one line up to LOG_TABLE_WIDTH.
    needed = measured.minimum if console.is_terminal else min(measured.maximum, LOG_TABLE_WIDTH)
    screen = console.width
    console.width = max(screen, needed, measured.minimum)  # print(width=) cannot widen past the console's own
    try:
        console.print(out)
    finally:
        console.width = screen


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``key=value`` strings → dict; raises a clear error on a pair without ``=``."""
    out: dict[str, str] = {}
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError([f"override {p!r} has no '='" for p in bad], "write overrides as key=value",
                          what="overrides")
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key.strip()] = value.strip()
    return out


def check_device(name: str | None) -> str:
    """A torch device this machine has: ``None`` → cuda when available, else cpu; an unavailable device is a
    one-line :class:`UnsupportedError` before any model is loaded."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError([f"--device {name!r} is not a torch device ({exc})"], "use cpu, cuda or cuda:N",
                          what="options") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError(f"--device {name}: this machine has no CUDA device (or torch was built without "
                                   "CUDA)", "use --device cpu, or leave --device out")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UnsupportedError(f"--device {name}: only {count} CUDA device(s) here",
                                   f"use cuda:0 … cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedError(f"--device {name}: MPS is not available here", "use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UnsupportedError(f"--device {name}: device type {device.type!r} is not supported", "use cpu or cuda")
    return str(device)


@contextlib.contextmanager
def output_dir(path: Path, force: bool, what: str) -> Iterator[Path]:
    """A directory to write ``what`` into: refused when ``path`` holds anything, unless ``force``; with
    ``force`` the new content is written beside it and replaces the old only once complete (no mix of old
    and new files, and the old stays if writing fails)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AlreadyExistsError(f"{what} target {path} is a file", "choose a directory path")
    occupied = path.is_dir() and any(path.iterdir())
    if occupied and not force:
        raise AlreadyExistsError(f"{what} target {path} is not empty",
                                 "choose a new or empty directory, or pass --force to replace it")
    if not occupied:
        yield path
        return
    staging = path.with_name(f".{path.name}.new")
    old = path.with_name(f".{path.name}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
