"""The report of a sweep as it stands: read ``<sweep dir>/state.json`` (written after every finished point) and
write the usual report files for the points finished so far, without the recipe, the data or a model — so a
sweep that runs for days (``scripts/realscale.sh``) can be read while it runs, from any process.

The report goes to ``<sweep dir>/interim/`` by default, never over the sweep's own report, and says how many of
the planned points it holds; the verdicts use only those points (a missing rank is simply absent). A stored
rank advice (``advice.json``) is judged again on those points, so its check against trained ranks is current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterhub_local.errors import ConfigError, NotFoundError
from adapterhub_local.sweep.advisor import reassess
from adapterhub_local.sweep.report import PointResult, write_report
from adapterhub_local.sweep.state import STATE_FILE

INTERIM_DIR = "interim"


def write_interim_report(sweep_dir: Path, out: Path | None = None,
                         tolerance: float | None = None) -> dict[str, Any]:
    """Write the report of the finished points of the sweep in ``sweep_dir``; returns its summary."""
    path = sweep_dir / STATE_FILE
    if not path.is_file():
        raise NotFoundError(f"{sweep_dir} holds no sweep ({STATE_FILE} is missing)",
                            "give the sweep's directory, runs/<sweep-id> (its name is printed when it starts)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        plan, results = state["plan"], state.get("results", {})
        rows = [PointResult.from_dict(value) for _, value in sorted(results.items())]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError([f"{path} is not a sweep state file ({exc})"],
                          "run the sweep again to rewrite it", what="sweep state") from exc
    if not rows:
        raise NotFoundError(f"no point of the sweep in {sweep_dir} has finished yet", "wait for the first point")
    config = plan.get("config", {})
    planned = len(plan.get("points", []))
    trained = sum(1 for r in rows if r.series == "trained")
    recipe = plan.get("recipe", {})
    advice_file = sweep_dir / "advice.json"
    advice = None
    if advice_file.is_file():
        try:
            advice = json.loads(advice_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{advice_file} is not JSON ({exc})"], "delete it and run the advisor again",
                              what="sweep advice") from exc
    tolerance = tolerance if tolerance is not None else float(config.get("tolerance", 0.01))
    if advice is not None:  # judged again on the points finished since it was written, with today's test
        advice = reassess(advice, rows, tolerance)
    meta = {"recipe": recipe.get("name"), "mode": config.get("mode"), "alpha_policy": config.get("alpha_policy"),
            "seeds": sorted({r.seed for r in rows}), "ranks": sorted({r.rank for r in rows}),
            "steps": recipe.get("train", {}).get("max_steps"), "epochs": recipe.get("train", {}).get("epochs"),
            "directory": str(out or sweep_dir / INTERIM_DIR),
            "progress": f"{trained} of {planned} planned points trained (interim report)"}
    return write_report(out or sweep_dir / INTERIM_DIR, str(plan.get("sweep_id") or sweep_dir.name), rows,
                        tolerance, meta, config.get("knee_metric"), advice)
