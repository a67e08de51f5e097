"""Training commands: ``train RECIPE [key=value ...] [--set key=value ...] [--resume]`` and
``eval REF --data FILE [--raw]``.

``train`` reports progress as a bar on a terminal and as a plain line every 30 s when its output goes to a log
(:mod:`adapterhub_local.progress`); evaluation lines appear in both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from adapterhub_local.check.sidecar import CHECKABLE_KINDS
from adapterhub_local.cli.common import (
    app,
    check_device,
    console,
    err_console,
    get_registry,
    parse_overrides,
    print_json,
    table,
)
from adapterhub_local.cli.registry_cmds import report_check
from adapterhub_local.config import Recipe
from adapterhub_local.progress import Progress, is_tty
from adapterhub_local.train.checks import PreparedData


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _interrupt(signum: int, frame: object) -> None:
    # `kill` (SIGTERM) ends a run like Ctrl-C: the loop checkpoints the last completed step first.
    raise KeyboardInterrupt


def _metric_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    return [[k, _fmt(v)] for k, v in metrics.items() if isinstance(v, int | float)]


def planned_steps(recipe: Recipe, data: PreparedData) -> int | None:
    """Optimizer steps the run will take (``None`` when packing makes it depend on token counts)."""
    from adapterhub_local.train.loop import total_steps

    if recipe.data.packing and not recipe.train.max_steps:
        return None
    cap = recipe.data.max_train_examples
    n = sum(min(len(s.splits.train), cap) if cap else len(s.splits.train) for s in data.sources)
    return total_steps(n, recipe.train)


class _LogProgress:
    """``on_step`` for a run whose output is not a terminal: plain progress lines (a resumed run counts its
    speed from the step it resumed at)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.started = time.monotonic()
        self.progress: Progress | None = None

    def __call__(self, step: int) -> None:
        if self.progress is None:
            self.progress = Progress(self.total, "train", tty=False, initial=step, started=self.started)
        self.progress.advance_to(step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


@app.command("train")
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=50 method.r=4."),
    sets: list[str] = typer.Option([], "--set", help="A key=value override (repeatable); same as positional ones."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest interrupted run of this recipe."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: runs/<name>-<time>)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar or progress lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check (engine = PEFT) after registering."),
) -> None:
    """Train an adapter from a recipe, evaluate it on held-out data, register it, and check that the engine
    serves it as PEFT runs it."""
    from adapterhub_local.train import distributed
    from adapterhub_local.train.checks import load_and_check
    from adapterhub_local.train.unit import UnitRequest, run_unit

    # Several processes (accelerate launch / torchrun): the main one reports, the others only train.
    processes = distributed.current()
    # With --json, stdout carries only the JSON summary; progress and status lines go to stderr.
    quiet_stdout: contextlib.AbstractContextManager[Any] = (
        contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext())
    if not processes.is_main:
        quiet_stdout = contextlib.redirect_stdout(io.StringIO())
    all_overrides = [*(overrides or []), *sets]
    with quiet_stdout:
        parsed, data = load_and_check(recipe, parse_overrides(all_overrides))
        splits = data.sources[0].splits
        console.print(f"[bold]{escape(parsed.name)}[/]: {escape(parsed.method.name)} on base {escape(parsed.base)}, "
                      f"task {escape(parsed.task.type)}; "
                      f"{sum(len(s.splits.train) for s in data.sources)} train / "
                      f"{sum(len(s.splits.validation) for s in data.sources)} validation / "
                      f"{sum(len(s.splits.test) for s in data.sources)} test rows"
                      + (f" (split by {splits.split_by})" if splits.split_by else ""), highlight=False)
        signal.signal(signal.SIGTERM, _interrupt)
        tty = is_tty(sys.stderr)
        log_progress = _LogProgress(planned_steps(parsed, data)) if not (no_progress or tty) else None
        try:
            registry = get_registry(create=True)
            request = UnitRequest(parsed, run_dir, resume="always" if resume else "never",
                                  progress=not no_progress and tty)
            result = run_unit(request, registry, data, on_step=log_progress)
        except KeyboardInterrupt:
            again = shlex.join(["adapterhub", "train", str(recipe), *all_overrides, "--resume"])
            err_console.print(f"interrupted; the last completed step is checkpointed. Continue with: {again}",
                              highlight=False)
            raise typer.Exit(130) from None
        finally:
            if log_progress is not None:
                log_progress.close()
        parity = None
        card = registry.resolve(result.ref) if result.ref else None
        if card is not None and not no_check and card.kind in CHECKABLE_KINDS:
            from adapterhub_local.check.parity import run_check

            parity = run_check(get_registry(), card.ref, device=check_device(None))
            report_check(parity)
    processes.finish()
    if not processes.is_main:
        return
    if as_json:
        print_json({"run_dir": str(result.run_dir), "metrics": result.metrics, "training": result.training,
                    "registered": result.ref, "samples": result.samples,
                    "parity": None if parity is None else dataclasses.asdict(parity)})
        return
    table("test metrics", ["metric", "value"], _metric_rows(result.metrics))
    facts = {k: v for k, v in result.training.items() if k in (
        "trainable_params", "total_params", "steps", "best_step", "tokens_per_s", "train_seconds", "wall_time_s",
        "peak_memory_mb")}
    table("run", ["fact", "value"], [[k, _fmt(v)] for k, v in facts.items()])
    if "forgetting" in result.training:
        table("forgetting (general-text perplexity)", ["", "value"], _metric_rows(result.training["forgetting"]))
    if result.samples:
        columns = list(result.samples[0])
        table("sample predictions (held-out)", columns, [[s[c] for c in columns] for s in result.samples],
              key_columns=0)
    if result.ref:
        console.print(f"registered [bold]{escape(result.ref)}[/] — run directory {escape(str(result.run_dir))}",
                      highlight=False)
    else:
        console.print(f"not registered ({escape(str(result.not_registered))}); results in "
                      f"{escape(str(result.run_dir))}", highlight=False)


@app.command("eval")
def eval_cmd(
    ref: str = typer.Argument(..., help="Adapter reference: name, name@N, name:tag or sha256:<prefix>."),
    data: Path | None = typer.Option(None, "--data", help="JSONL/CSV file or datasets directory to evaluate on "
                                     "(omit it for a combined adapter: then each parent's task, held-out split)."),
    template: str | None = typer.Option(None, help="Input/prompt template (default: the adapter's recipe)."),
    completion: str | None = typer.Option(None, help="Completion template for generation adapters."),
    text_field: str | None = typer.Option(None, help="Text field for classification (no template)."),
    label_field: str | None = typer.Option(None, help="Label field for classification."),
    max_examples: int | None = typer.Option(None, help="Evaluate on the first N rows only."),
    batch_size: int = typer.Option(32, help="Evaluation batch size."),
    max_new_tokens: int | None = typer.Option(None, help="Generation length (default: the recipe's)."),
    raw: bool = typer.Option(False, "--raw", help="Ignore the adapter's templates: the input is the --text-field "
                             "column as is, and for generation the reference is the --label-field column."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Evaluate a registered adapter on a data file with its task's metrics (in its trained format)."""
    from adapterhub_local.train.eval_ref import EvalOptions, evaluate_ref

    if data is None:  # a combination: a task × adapter table over its parents' tasks (adapterhub_local.compose)
        from adapterhub_local.cli.compose_cmds import eval_combination

        eval_combination(ref, max_examples, batch_size, max_new_tokens, as_json)
        return
    if raw:
        # Plain fields are templates too: "{text}" is the text column unchanged.
        template = template or "{" + (text_field or "text") + "}"
        completion = completion or "{" + (label_field or "label") + "}"
    options = EvalOptions(template, completion, text_field, label_field, max_examples, batch_size, max_new_tokens)
    result = evaluate_ref(get_registry(), ref, data, options)
    if as_json:
        print_json(result)
        return
    table(f"{result['ref']} on {data}", ["metric", "value"], _metric_rows(result))
