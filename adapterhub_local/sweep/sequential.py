"""Sequential sweep mode: one call of the training runner per (rank, seed) point, in this process.

Each point gets its own run directory under ``runs/<sweep-id>/runs/<point>/``; a point interrupted mid-run
continues from the runner's own checkpoint (``resume``) when the sweep is started again. The peak memory of
each point is its own: the process's resident high-water mark is reset before the point where Linux allows
it (``/proc/self/clear_refs``) and read back after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.plan import SweepPlan, SweepPoint
from adapterhub_local.sweep.report import PointResult
from adapterhub_local.sweep.state import SweepState, adopt_registered, result_from_card
from adapterhub_local.train.checks import PreparedData


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


def point_run_dir(sweep_dir: Path, point: SweepPoint) -> Path:
    return sweep_dir / "runs" / point.key


def train_sequential(registry: Registry, plan: SweepPlan, state: SweepState, data: PreparedData, sweep_dir: Path,
                     *, progress: bool = True, log: Callable[[str], Any] = print,
                     points: list[SweepPoint] | None = None) -> None:
    """Train every point of ``points`` (default: the whole plan) not yet done, one runner call each, recording
    each as it finishes."""
    from adapterhub_local.train import runner

    for point in plan.points if points is None else points:
        if state.done(point):
            continue
        card = adopt_registered(registry, point, plan.sweep_id)
        peak: float | None = None
        if card is None:
            run_dir = point_run_dir(sweep_dir, point)
            resume = (run_dir / "checkpoint" / "state.json").exists() and not (run_dir / runner.FINAL).exists()
            log(f"[{plan.sweep_id}] training r={point.rank} seed={point.seed}"
                + (" (resuming its checkpoint)" if resume else ""))
            reset = reset_peak_rss()
            started = time.perf_counter()
            result = runner.run(point.recipe_for(plan.recipe, plan.sweep_id), data, registry, resume=resume,
                                run_dir=run_dir, progress=progress)
            peak = peak_rss_mb() if reset else None
            if result.card is None:
                raise UnsupportedError(f"the runner did not register r={point.rank}: {result.not_registered}",
                                   "set output.register: true in the recipe")
            card = result.card
            log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed} → {card.ref} "
                f"({time.perf_counter() - started:.1f} s)")
        else:
            log(f"[{plan.sweep_id}] r={point.rank} seed={point.seed}: adopting registered {card.ref}")
        row: PointResult = result_from_card(registry, card, point, "sequential")
        if peak is not None:
            row.peak_mem_mb = peak
        state.record(point, row)
