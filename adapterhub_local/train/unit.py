"""The unit of work ``train/`` owns: a resolved recipe in → a trained, evaluated, registered result out.

Design note. Everything that turns one recipe into one registered adapter goes through here, whoever asks:
``adapterhub train``, a sequential sweep (one unit per point, in this process), a concurrent sweep (many adapters
trained in one joint model, each then *finished* by :func:`finish_unit` — the same final evaluation, run
directory, saving and registration as a plain run) and the Ray executor (one unit per Ray task, in a worker
process). Outside ``train/``, callers import only this module; what they need of a run's set-up to train or
evaluate adapters themselves (the concurrent sweep's joint model, SVD truncations, beam search) is re-exported
here from :mod:`.context`, so ``train/``'s internals stay free to change.

* :class:`UnitRequest` / :class:`UnitResult` are plain data with ``to_dict`` / ``from_dict`` (JSON types only): a
  request crosses process boundaries (Ray) as the recipe's dict and paths, never as live objects.
* ``resume="auto"`` continues the run directory's checkpoint when it holds an interrupted run.
* ``reuse_tagged`` makes a unit idempotent: when the recipe's ``output.tag`` already names a version of this
  adapter registered from the same recipe (an earlier attempt that registered and then died before its caller
  recorded it, e.g. a retried Ray task), that version is returned instead of training a second one.
* ``data_fingerprint``: the data the caller checked; a unit that reads different data (another machine, a file
  changed since) refuses rather than train on it.
* Registration happens inside the unit, in whichever process runs it: the registry is multi-process safe
  (every mutation under its inter-process lock, versions published by atomic rename; DESIGN.md, "The registry is
  the contract"), so parallel units never lose or tear a version.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterhub_local import runtime
from adapterhub_local.config import Recipe, parse_recipe, recipe_values_off_default
from adapterhub_local.errors import ConfigError, NotFoundError, UnsupportedError
from adapterhub_local.registry import AdapterCard, Registry
from adapterhub_local.train import runner
from adapterhub_local.train.checks import PreparedData, check
from adapterhub_local.train.context import (
    RunContext,
    adapter_layout,
    base_model,
    beam_eval,
    evaluate_state,
    initial_adapter,
    trainable_with,
)
from adapterhub_local.train.context import run_context as open_context
from adapterhub_local.train.methods import recipe_targets
from adapterhub_local.train.runner import ensure_base

__all__ = [
    "PreparedData", "RunContext", "TrainedElsewhere", "UnitRequest", "UnitResult", "adapter_layout", "base_model",
    "beam_eval", "ensure_base", "evaluate_state", "finish_unit", "initial_adapter", "open_context",
    "open_registry", "peak_rss_mb", "prepare_data", "recipe_targets", "registry_location", "reset_peak_rss",
    "run_unit",
]

RESUME_MODES = ("never", "auto", "always")


@dataclass
class UnitRequest:
    """One unit of work: train, evaluate and register the adapter of ``recipe``."""

    recipe: Recipe
    """The resolved recipe (overrides applied)."""
    run_dir: Path | None = None
    """Run directory (default: ``<runs_dir>/<name>-<UTC time>``)."""
    resume: str = "never"
    """``never`` | ``auto`` (continue ``run_dir``'s checkpoint if it holds an interrupted run) | ``always``."""
    reuse_tagged: bool = False
    """Return the version ``<name>:<output.tag>`` when it was registered from this same recipe."""
    require_registered: bool = False
    """Refuse a recipe that does not register its result (``output.register: false``)."""
    data_fingerprint: str | None = None
    """The fingerprint of the data the caller checked; a unit that reads other data refuses."""
    progress: bool = False
    """Show a progress bar."""

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "run_dir": None if self.run_dir is None else str(self.run_dir),
                "resume": self.resume, "reuse_tagged": self.reuse_tagged,
                "require_registered": self.require_registered, "data_fingerprint": self.data_fingerprint,
                "progress": self.progress}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitRequest:
        recipe, problems = parse_recipe(dict(data["recipe"]))
        if problems:
            raise ConfigError(problems, "send a request built from a valid recipe", what="unit request")
        run_dir = data.get("run_dir")
        return cls(recipe, Path(run_dir) if run_dir else None, str(data.get("resume", "never")),
                   bool(data.get("reuse_tagged")), bool(data.get("require_registered")),
                   data.get("data_fingerprint"), bool(data.get("progress")))


@dataclass
class UnitResult:
    """What a unit produced: the registered reference (or why nothing was registered) and its evaluation."""

    run_dir: Path
    ref: str | None
    metrics: dict[str, Any]
    """Held-out test metrics (as on the card)."""
    training: dict[str, Any]
    """Run facts (steps, tokens/s, wall time …, as on the card)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    not_registered: str | None = None
    resumed: bool = False
    """The run continued an interrupted run's checkpoint."""
    reused: bool = False
    """Nothing was trained: an earlier attempt's registered version was returned (``reuse_tagged``)."""
    peak_rss_mb: float | None = None
    """This unit's own peak resident memory (None where the kernel cannot reset the high-water mark)."""
    host: str = ""
    pid: int = 0
    """Where it ran."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        # JSON types only (a result crosses processes); non-finite floats survive as JSON's NaN / Infinity.
        parsed: dict[str, Any] = json.loads(json.dumps(out, default=float))
        return parsed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitResult:
        values = dict(data)
        values["run_dir"] = Path(values["run_dir"])
        return cls(**values)


@dataclass
class TrainedElsewhere:
    """An adapter trained outside the runner's loop (a concurrent sweep's joint model), with its run facts."""

    state: dict[str, torch.Tensor]
    """Its PEFT state (saved key names), at its best evaluation."""
    evals: list[dict[str, Any]]
    """Every periodic evaluation, as the runner logs them (``{"step", "epoch", "eval"}``)."""
    steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    train_seconds: float
    """Its share of the training time."""
    train_tokens: int
    trainable_params: int
    peak_memory_mb: float | None
    peak_memory_kind: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Further run facts recorded with it (e.g. ``mode``, ``sweep_id``)."""


def prepare_data(recipe: Recipe) -> PreparedData:
    """The recipe's data, read and checked (one :class:`ConfigError` listing every problem)."""
    return check(recipe)


def registry_location(registry: Registry) -> str:
    """What :func:`open_registry` needs to open ``registry`` again in another process."""
    url = getattr(registry, "url", None)  # an object-store registry (registry/objectstore.py)
    return str(url) if url else str(registry.root.resolve())


def open_registry(location: str) -> Registry:
    """The registry at ``location`` (a directory or ``s3://bucket/prefix``); it must exist."""
    from adapterhub_local.registry.objectstore import ObjectStoreRegistry, is_remote

    return ObjectStoreRegistry(location, create=False) if is_remote(location) else Registry(location, create=False)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float | None:
    """This process's peak RSS since the last reset (VmHWM), in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _check_request(request: UnitRequest, data: PreparedData) -> None:
    problems = []
    if request.resume not in RESUME_MODES:
        problems.append(f"resume {request.resume!r} is not one of {', '.join(RESUME_MODES)}")
    if request.data_fingerprint is not None and data.fingerprint != request.data_fingerprint:
        problems.append(f"{socket.gethostname()} read data with fingerprint {data.fingerprint[:12]}…, not the "
                        f"{request.data_fingerprint[:12]}… the caller checked")
    if request.require_registered and not request.recipe.output.register:
        problems.append("the recipe does not register its result (output.register is false)")
    if problems:
        raise ConfigError(problems, "give every worker the same data files at the same paths (a shared filesystem) "
                          "and a recipe with output.register: true", what=f"unit {request.recipe.name!r}")


def _normalized(recipe: dict[str, Any]) -> Any:
    return json.loads(json.dumps(recipe_values_off_default(recipe), sort_keys=True, default=str))


def tagged_version(registry: Registry, recipe: Recipe) -> AdapterCard | None:
    """The version ``<name>:<output.tag>`` when it was registered from this same recipe, else None."""
    if not recipe.output.tag:
        return None
    try:
        card = registry.resolve(f"{recipe.name}:{recipe.output.tag}")
    except NotFoundError:
        return None
    same = isinstance(card.recipe, dict) and _normalized(card.recipe) == _normalized(recipe.to_dict())
    return card if same else None


def _where() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def run_unit(request: UnitRequest, registry: Registry, data: PreparedData | None = None, *,
             on_step: Callable[[int], None] | None = None) -> UnitResult:
    """Train, evaluate and register ``request.recipe`` (``data``: already checked; read here when None)."""
    recipe = request.recipe
    data = data if data is not None else prepare_data(recipe)
    _check_request(request, data)
    if request.reuse_tagged:
        card = tagged_version(registry, recipe)
        if card is not None:
            return UnitResult(Path(str(card.extra.get("run_dir", ""))), card.ref, dict(card.metrics),
                              dict(card.training), reused=True, **_where())
    run_dir = request.run_dir
    resume = request.resume == "always" or (request.resume == "auto" and run_dir is not None
                                            and runner.is_resumable(run_dir))
    reset = reset_peak_rss()
    result = runner.run(recipe, data, registry, resume=resume, run_dir=run_dir, progress=request.progress,
                        on_step=on_step)
    peak = peak_rss_mb() if reset else None
    if result.card is None and request.require_registered:
        raise UnsupportedError(f"{recipe.name} was not registered: {result.not_registered}",
                               "set output.register: true in the recipe")
    return UnitResult(result.run_dir, result.card.ref if result.card else None, result.metrics, result.training,
                      result.samples, result.not_registered, resume, False, peak, **_where())


def finish_unit(request: UnitRequest, registry: Registry, data: PreparedData, ctx: RunContext,
                trained: TrainedElsewhere) -> UnitResult:
    """The runner's tail for an adapter trained elsewhere: final evaluation, run directory (recipe, evaluation
    log, final metrics), PEFT save and registration — as :func:`run_unit` does after its own training."""
    started = time.perf_counter()
    recipe = request.recipe
    _check_request(request, data)
    if request.run_dir is None:
        raise ConfigError(["finishing an adapter trained elsewhere needs its run directory"], "give run_dir",
                          what=f"unit {recipe.name!r}")
    trainable = trainable_with(ctx, recipe, trained.state)
    run_dir = request.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runner.RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2), encoding="utf-8")
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as handle:
        for record in trained.evals:
            handle.write(json.dumps(record, default=float) + "\n")
    final, samples = runner.final_eval(recipe, trainable, ctx.tokenizer, ctx.encoded, ctx.labels, ctx.pad_id)
    share = trained.train_seconds
    training = {
        "method": trainable.method, "trainable_params": trained.trainable_params,
        "total_params": trainable.total_params,
        "trainable_fraction": trained.trainable_params / max(trainable.total_params, 1), "steps": trained.steps,
        "best_step": trained.best_step, "best_metric": {ctx.metric: trained.best_metric},
        "stopped_early": trained.stopped_early, "train_seconds": share, "train_tokens": trained.train_tokens,
        "tokens_per_s": trained.train_tokens / share if share > 0 else 0.0,
        "wall_time_s": share + time.perf_counter() - started,
        "peak_memory_mb": trained.peak_memory_mb, "peak_memory_kind": trained.peak_memory_kind,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "precision": runtime.resolve_precision(recipe.train.precision), **trained.extra,
        "train_examples": len(ctx.encoded.train), "validation_examples": len(ctx.encoded.validation),
    }
    forgetting = final.pop("forgetting", None)
    if forgetting is not None:
        training["forgetting"] = forgetting
    card, why_not = runner.finish_run(recipe, data, registry, trainable, run_dir, final, training, samples,
                                      ctx.labels)
    if card is None and request.require_registered:
        raise UnsupportedError(f"{recipe.name} was not registered: {why_not}", "set output.register: true")
    return UnitResult(run_dir, card.ref if card else None, final, training, samples, why_not,
                      peak_rss_mb=trained.peak_memory_mb, **_where())
