"""Sequential sweep mode: one unit of work (:func:`adapterhub_local.train.unit.run_unit`) per (rank, seed) point, in
this process, each recorded as it finishes.

Each point gets its own run directory under ``runs/<sweep-id>/runs/<point>/``; a point interrupted mid-run
continues from its checkpoint (``resume="auto"``) when the sweep is started again, and a point an earlier attempt
registered is adopted rather than trained twice (``reuse_tagged``). The peak memory of each point is its own
(the unit resets the process's resident high-water mark where Linux allows it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.plan import SweepPlan, SweepPoint
from adapterhub_local.sweep.report import PointResult
from adapterhub_local.sweep.state import SweepState, result_from_card
from adapterhub_local.train.unit import PreparedData, UnitRequest, UnitResult, run_unit


def point_run_dir(sweep_dir: Path, point: SweepPoint) -> Path:
    return sweep_dir / "runs" / point.key


def point_request(plan: SweepPlan, point: SweepPoint, sweep_dir: Path, data_fingerprint: str | None = None,
                  progress: bool = False) -> UnitRequest:
    """The unit of work of one sweep point (the same whichever executor runs it)."""
    return UnitRequest(point.recipe_for(plan.recipe, plan.sweep_id), point_run_dir(sweep_dir, point), resume="auto",
                       reuse_tagged=True, require_registered=True, data_fingerprint=data_fingerprint,
                       progress=progress)


def point_row(registry: Registry, point: SweepPoint, result: UnitResult, mode: str) -> PointResult:
    """The report row of a point from its unit's result (the card's metrics, the unit's own peak memory)."""
    row = result_from_card(registry, registry.resolve(str(result.ref)), point, mode)
    if result.peak_rss_mb is not None and not result.reused:
        row.peak_mem_mb = result.peak_rss_mb
    return row


def train_sequential(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData, sweep_dir: Path,
                     *, progress: bool = True, log: Callable[[str], Any] = print,
                     points: list[SweepPoint] | None = None,
                     after_point: Callable[[SweepPoint], Any] | None = None) -> None:
    """Train every point of ``points`` (default: the whole plan) not yet done, one unit each, recording each as
    it finishes; ``after_point`` is called with each point once it is recorded."""
    for point in plan.points if points is None else points:
        if state.done(point):
            continue
        started = time.perf_counter()
        request = point_request(plan, point, sweep_dir, progress=progress)
        log(f"[{plan.sweep_id}] training r={point.rank} seed={point.seed}")
        result = run_unit(request, registry, data)
        if result.reused:
            log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed}: adopting registered {result.ref}")
        else:
            log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed} → {result.ref} "
                f"({time.perf_counter() - started:.1f} s" + (", resumed its checkpoint)" if result.resumed else ")"))
        state.record(point, point_row(registry, point, result, "sequential"))
        if after_point is not None:
            after_point(point)
