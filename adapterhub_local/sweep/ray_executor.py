"""The Ray executor: a sweep's pending points spread over a Ray cluster, each task running ``train/``'s unit of work.

Design note.

* **What a task is.** Sequential mode: one Ray task per point, running
  :func:`adapterhub_local.train.unit.run_unit` — the same unit the local executor runs in-process. Concurrent
  mode: one task per *group* of points (``group_size`` points, default: the pending points split evenly over the
  cluster's task slots), running :func:`adapterhub_local.sweep.concurrent_run.train_group` — one joint model per
  group, each adapter finished by ``unit.finish_unit``. Each task asks Ray for ``num_cpus`` / ``num_gpus``.
* **What crosses the wire.** Plain data only: the recipe as its dict, points as their fields, paths and the
  registry's location as strings (:meth:`UnitRequest.to_dict`); results come back as
  :meth:`UnitResult.to_dict`. No tensors or live objects travel; adapters travel through the registry.
* **Who writes what.** Workers write their own point's run directory and register their adapters — the
  registry is multi-process safe (inter-process lock, atomic publish; DESIGN.md), so that is where it is safe.
  The sweep state (``state.json``) has one writer: the driver, which records each point as its task returns;
  the report, plots, truncated curve and extra scoring run in the driver afterwards, exactly as for the local
  executor. So a sweep started locally can be finished on Ray and the other way round: the state, the point
  run directories and the registry tags are the same.
* **Failures.** A worker that dies mid-task (killed, out of memory, node lost) is retried by Ray
  (``max_retries``; application errors are not retried: they would fail again). A retried point continues its
  run directory's checkpoint if one was written, and a point whose earlier attempt had already registered its
  adapter is returned from the registry instead of being trained twice (``reuse_tagged``). Each attempt leaves
  ``<sweep>/attempts/<point>.<host>.<pid>.json`` (where and when it started). If the driver dies, re-running
  the sweep adopts what the workers registered and trains the rest.
* **Where paths resolve.** Every task runs in the driver's working directory, so the recipe's relative paths
  mean what they mean to the driver: on several machines the data, the runs directory and a directory
  registry must be on a filesystem every node mounts at the same path (or use an ``s3://`` registry). A worker
  whose data fingerprint differs from the driver's refuses to train.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_local.config import Recipe, parse_recipe
from adapterhub_local.errors import AdapterHubError, ConfigError, UnsupportedError
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.plan import SweepConfig, SweepPlan, SweepPoint
from adapterhub_local.sweep.sequential import point_request, point_row
from adapterhub_local.sweep.state import SweepState
from adapterhub_local.train.unit import (
    PreparedData,
    UnitRequest,
    UnitResult,
    open_registry,
    prepare_data,
    registry_location,
    run_unit,
)

EXECUTORS = ("local", "ray")
ATTEMPTS = "attempts"


@dataclass
class ExecutorOptions:
    """Where a sweep's points run (not part of the plan: a sweep resumes under another executor)."""

    executor: str = "local"
    """``local`` (this process) | ``ray`` (tasks on a Ray cluster)."""
    address: str | None = None
    """Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``); default: a Ray runtime already
    initialised in this process, else ``$RAY_ADDRESS``, else a new local one."""
    num_cpus: float = 1.0
    """CPUs each Ray task asks for."""
    num_gpus: float = 0.0
    """GPUs each Ray task asks for."""
    max_retries: int = 3
    """Times Ray re-runs a task whose worker died."""
    group_size: int | None = None
    """Concurrent mode on Ray: points per task (default: the pending points split over the cluster's slots)."""

    def validate(self) -> None:
        problems = []
        if self.executor not in EXECUTORS:
            problems.append(f"executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.address and self.executor != "ray":
            problems.append("--address names a Ray cluster; give it with --executor ray")
        if not self.num_cpus > 0 or self.num_gpus < 0:
            problems.append(f"task resources num_cpus={self.num_cpus}, num_gpus={self.num_gpus}: need CPUs > 0, "
                            "GPUs >= 0")
        if self.max_retries < 0:
            problems.append(f"--max-retries {self.max_retries}: must be >= 0")
        if self.group_size is not None and self.group_size < 1:
            problems.append(f"--group-size {self.group_size}: must be >= 1")
        if problems:
            raise ConfigError(problems, "fix the executor options", what="executor")


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UnsupportedError("--executor ray needs Ray, which is not installed",
                               "pip install 'adapterhub_local[ray]' (or use --executor local)") from exc
    return ray


@contextlib.contextmanager
def _connected(options: ExecutorOptions) -> Iterator[Any]:
    """Ray, initialised: the runtime already running in this process, else one started (and stopped) here."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _working_dir(path: str) -> Iterator[None]:
    """Run in the driver's working directory (the recipe's relative paths are the driver's)."""
    before = os.getcwd()
    if not Path(path).is_dir():
        raise ConfigError([f"the driver's working directory {path} does not exist on {socket.gethostname()}"],
                          "run the workers where the driver's files are visible at the same paths", what="worker")
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _note_attempt(sweep_dir: Path, points: list[dict[str, Any]]) -> None:
    folder = sweep_dir / ATTEMPTS
    folder.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    record = json.dumps({"host": host, "pid": pid, "started": time.time()})
    for point in points:
        (folder / f"{SweepPoint(**point).key}.{host}.{pid}.json").write_text(record, encoding="utf-8")


def _data_recipe(payload: dict[str, Any]) -> Recipe:
    recipe, problems = parse_recipe(dict(payload["recipe"]))
    if problems:
        raise ConfigError(problems, "start the sweep from a valid recipe", what="sweep recipe")
    return recipe


def _checked_data(payload: dict[str, Any]) -> PreparedData:
    """The sweep's data as this worker reads it; refused when it is not the data the driver checked."""
    data = prepare_data(_data_recipe(payload))
    if data.fingerprint != payload["data_fingerprint"]:
        raise ConfigError([f"{socket.gethostname()} read the sweep's data with fingerprint {data.fingerprint[:12]}…, "
                           f"the driver {payload['data_fingerprint'][:12]}…"],
                          "give every worker the same data files at the same paths", what="worker data")
    return data


def point_task(payload: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: one point's unit of work (sequential mode). Runs in a worker process."""
    with _working_dir(payload["cwd"]):
        _note_attempt(Path(payload["sweep_dir"]), payload["points"])
        data = _checked_data(payload)
        request = UnitRequest.from_dict(payload["request"])
        return run_unit(request, open_registry(payload["registry"]), data).to_dict()


def group_task(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """A Ray task: one group of points trained in one joint model (concurrent mode). Runs in a worker process."""
    from adapterhub_local.sweep.concurrent_run import train_group

    with _working_dir(payload["cwd"]):
        _note_attempt(Path(payload["sweep_dir"]), payload["points"])
        data = _checked_data(payload)
        points = [SweepPoint(**p) for p in payload["points"]]
        plan = SweepPlan(payload["sweep_id"], _data_recipe(payload), SweepConfig(mode="concurrent"), points, {})
        results = train_group(open_registry(payload["registry"]), plan, points, data, Path(payload["sweep_dir"]),
                              progress=False, log=print, data_fingerprint=payload["data_fingerprint"])
        return [r.to_dict() for r in results]


def _groups(points: list[SweepPoint], size: int | None, slots: int) -> list[list[SweepPoint]]:
    size = size or math.ceil(len(points) / max(1, min(slots, len(points))))
    return [points[i: i + size] for i in range(0, len(points), size)]


def _failure(exc: BaseException) -> BaseException:
    """The error a failed task raised in its worker (our own errors unwrapped), else Ray's."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, AdapterHubError) else exc


def train_on_ray(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData, sweep_dir: Path,
                 points: list[SweepPoint], options: ExecutorOptions, *, concurrent: bool,
                 log: Callable[[str], Any] = print) -> None:
    """Run ``points`` as Ray tasks and record each result in ``state`` as its task returns (this process is the
    state's only writer). Every point is waited for; then the first failure, if any, is raised."""
    mode = "concurrent" if concurrent else "sequential"
    with _connected(options) as ray:
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // options.num_cpus))
        groups = _groups(points, options.group_size, slots) if concurrent else [[p] for p in points]
        common = {"cwd": os.getcwd(), "sweep_dir": str(sweep_dir.resolve()), "registry": registry_location(registry),
                  "recipe": plan.recipe.to_dict(), "data_fingerprint": data.fingerprint, "sweep_id": plan.sweep_id}
        task = ray.remote(group_task if concurrent else point_task).options(
            num_cpus=options.num_cpus, num_gpus=options.num_gpus, max_retries=options.max_retries,
            retry_exceptions=False)
        submitted: dict[Any, list[SweepPoint]] = {}
        for group in groups:
            payload = {**common, "points": [dict(p.__dict__) for p in group]}
            if not concurrent:
                payload["request"] = point_request(plan, group[0], sweep_dir.resolve()).to_dict()
            submitted[task.remote(payload)] = group
        log(f"[{plan.sweep_id}] ray: {len(points)} point(s) in {len(groups)} task(s) of {options.num_cpus:g} CPU"
            + (f" + {options.num_gpus:g} GPU" if options.num_gpus else "") + f" each, {slots} slot(s) in the cluster")
        waiting = list(submitted)
        failures: list[BaseException] = []
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    group = submitted[ref]
                    try:
                        returned = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        failures.append(_failure(exc))
                        log(f"[{plan.sweep_id}] ray: {', '.join(p.key for p in group)} failed: {failures[-1]}")
                        continue
                    for point, raw in zip(group, returned if concurrent else [returned], strict=True):
                        result = UnitResult.from_dict(raw)
                        state.record(point, point_row(registry, point, result, mode))
                        how = "adopted" if result.reused else "resumed" if result.resumed else "trained"
                        log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed} → {result.ref} "
                            f"({how} on {result.host} pid {result.pid})")
        except BaseException:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise
        if failures:
            raise failures[0]


def attempts(sweep_dir: Path, point: SweepPoint) -> list[dict[str, Any]]:
    """Every recorded attempt of ``point`` on Ray (``host``, ``pid``, ``started``), oldest first."""
    folder = sweep_dir / ATTEMPTS
    found = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob(f"{point.key}.*.json")] \
        if folder.is_dir() else []
    return sorted(found, key=lambda a: float(a["started"]))
