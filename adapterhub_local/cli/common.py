"""Shared CLI plumbing: the typer app, the global ``--registry`` option, rich output, ``--json``.

Command modules (``registry_cmds``, ``train_cmds`` …) import ``app`` from here and register their
commands on it; they parse arguments and call into the layers below, with no logic of their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from adapterhub_local.registry.store import Registry

app = typer.Typer(
    name="adapterhub",
    help="Local platform for PEFT adapters: registry, training, rank sweeps, multi-adapter serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

_state: dict[str, Any] = {"registry": None}


@app.callback()
def _global_options(
    registry: Path | None = typer.Option(
        None, "--registry", "-R", help="Registry directory (default: $ADAPTERHUB_HOME or ./registry)."
    ),
) -> None:
    _state["registry"] = registry


def get_registry(create: bool = False) -> Registry:
    """The registry chosen by ``--registry`` / ``$ADAPTERHUB_HOME`` / ``./registry``. Only commands that
    add to it (base add, import, pull, train, sweep) pass ``create=True``; every other command refuses a
    path that holds no registry instead of creating an empty one."""
    return Registry(_state["registry"], create=create)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (no colour, no wrapping)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a rich table."""
    out = Table(title=title, show_lines=False)
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*["" if v is None else str(v) for v in row])
    console.print(out)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``key=value`` strings → dict; raises a clear error on a pair without ``=``."""
    from adapterhub_local.errors import ConfigError

    out: dict[str, str] = {}
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError([f"override {p!r} has no '='" for p in bad], "write overrides as key=value",
                          what="overrides")
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key.strip()] = value.strip()
    return out
