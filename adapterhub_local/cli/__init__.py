"""The ``adapterhub`` command line: argument parsing only; every command calls into the layers below.

Every error prints one line on stderr and exits non-zero: the project's error family as ``problem — fix``,
usage errors with a pointer to ``--help``, and anything unexpected (a bug, an OS error) as its type and
message — the traceback only with ``--verbose``.
"""

from __future__ import annotations

import importlib
import os
import sys

if not sys.stderr.isatty():
    # Progress bars are for terminals; in a log their carriage returns are noise. Libraries that draw their own
    # tqdm bars (transformers' GGUF conversion, hub downloads) read $TQDM_DISABLE when tqdm is first imported —
    # by torch, below — so it is set here, first. Bars this project draws on purpose pass `disable` explicitly.
    os.environ.setdefault("TQDM_DISABLE", "1")

import typer

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_errors  # type: ignore[no-redef]

from adapterhub_local.cli.common import app, err_console, hoist_global_options, verbose
from adapterhub_local.errors import AdapterHubError

# Command groups register themselves on ``app`` when imported. A group whose module is absent
# (e.g. a layer not built yet) is simply not offered.
_COMMAND_MODULES = ("registry_cmds", "train_cmds", "infer_cmds", "sweep_cmds", "serve_cmds", "compose_cmds",
                    "export_cmds")
for _module in _COMMAND_MODULES:
    try:
        importlib.import_module(f"adapterhub_local.cli.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"adapterhub_local.cli.{_module}":
            raise


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run one command, return its exit status."""
    from rich.markup import escape

    command = typer.main.get_command(app)
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv), command)
    try:
        result = command.main(args=args, prog_name="adapterhub", standalone_mode=False)
    except AdapterHubError as exc:
        _error(escape(_one_line(str(exc))))
        return exc.exit_code
    except click_errors.NoArgsIsHelpError as exc:
        return exc.exit_code  # the help text is already printed
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "adapterhub"
        _error(escape(_one_line(exc.format_message())) + f" — see `{escape(where)} --help`")
        return exc.exit_code
    except click_errors.ClickException as exc:
        _error(escape(_one_line(exc.format_message())))
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        if verbose():
            raise
        _error(escape(_one_line(f"{type(exc).__name__}: {exc}")) + " — run again with --verbose for the traceback")
        return 1
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())


__all__ = ["app", "main", "run"]
