"""The ``adapterhub`` command line: argument parsing only; every command calls into the layers below.

Errors from the project's error family print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import importlib
import sys

from adapterhub_local.cli.common import app, err_console
from adapterhub_local.errors import AdapterHubError

# Command groups register themselves on ``app`` when imported. A group whose module is absent
# (e.g. a layer not built yet) is simply not offered.
_COMMAND_MODULES = ("registry_cmds", "train_cmds", "infer_cmds", "sweep_cmds", "serve_cmds")
for _module in _COMMAND_MODULES:
    try:
        importlib.import_module(f"adapterhub_local.cli.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"adapterhub_local.cli.{_module}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="adapterhub", standalone_mode=True)
    except AdapterHubError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def run() -> None:
    sys.exit(main())


__all__ = ["app", "main", "run"]
