"""The Ray executor on a real local Ray cluster (2 CPU slots, so up to 2 worker processes, started by the tests):
Ray sweep = local sweep for the same seeds, a worker killed mid-task is retried, resume across executors."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.config import Recipe
from adapterhub_local.registry import Registry
from adapterhub_local.sweep.driver import run_sweep
from adapterhub_local.sweep.plan import SweepConfig, SweepPoint
from adapterhub_local.sweep.ray_executor import ExecutorOptions, attempts
from tests.sweep.conftest import make_tiny_llama_with_tokenizer, recipe_for

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'adapterhub_local[ray]' (in the dev extra)")

RAY = ExecutorOptions("ray", num_cpus=1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One local Ray runtime with 2 CPU slots for the whole module (starting Ray costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    # Both worker slots import the training stack now, while the local baseline sweep runs (not waited for).
    warm = [ray.remote(num_cpus=1)(_import_training_stack).remote() for _ in range(2)]
    yield ray
    del warm
    ray.shutdown()


def _import_training_stack() -> int:
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import adapterhub_local.sweep.concurrent_run
    import adapterhub_local.sweep.ray_executor  # noqa: F401

    return os.getpid()


@pytest.fixture(scope="module")
def world(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A registry with a tiny Llama, a small generation data set, and a local sequential sweep to compare with."""
    root = tmp_path_factory.mktemp("ray")
    registry = Registry(root / "registry")
    registry.add_base("tiny-lm", str(make_tiny_llama_with_tokenizer(root / "tiny-lm")))
    data = root / "gen.jsonl"
    data.write_text("".join(json.dumps({"mr": f"name[{n}], food[{f}]", "ref": f"{n} serves {f} food."}) + "\n"
                            for n in ("Aromi", "Cotto", "Giraffe", "Loch Fyne", "Strada", "Zizzi")
                            for f in ("Chinese", "French", "Italian")), encoding="utf-8")
    local = _sweep(registry, _recipe(data, root / "runs"), "sw-local", [1, 4], "sequential", ExecutorOptions())
    return {"root": root, "registry": registry, "data": data, "local": local}


def _recipe(data: Path, runs: Path, name: str = "tgen") -> Recipe:
    recipe = recipe_for("gen", data, runs, max_steps=3, eval_every=2)
    recipe.name = name
    return recipe


def _sweep(registry: Registry, recipe: Recipe, sweep_id: str, ranks: list[int], mode: str,
           executor: ExecutorOptions, **kwargs: Any) -> dict[int, dict[str, Any]]:
    config = SweepConfig(ranks=ranks, mode=mode, sweep_id=sweep_id, e2e_metrics=False)
    # A Ray task computes on as many threads as it has CPUs (RAY's 1); a local point computes on this process's
    # threads. Bit-identical adapters need the same thread count (sums split across threads round differently),
    # so the local side runs on RAY's count here, whatever an earlier test left this process at.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(RAY.num_cpus))
    try:
        summary = run_sweep(registry, recipe, config, progress=False, executor=executor,
                            log=kwargs.get("log", lambda _: None))
    finally:
        torch.set_num_threads(threads)
    points = json.loads((Path(summary["directory"]) / "results.json").read_text())["points"]
    return {p["rank"]: p for p in points}


def _same_adapter(registry: Registry, a: str, b: str, exact: bool) -> None:
    x, y = registry.load_adapter(a).tensors, registry.load_adapter(b).tensors
    assert x.keys() == y.keys()
    for key in x:
        if exact:
            assert torch.equal(x[key], y[key]), key
        else:  # a joint model runs the base on a larger batch: floating-point noise only
            scale = float(x[key].abs().max()) + 1e-12
            assert torch.allclose(x[key], y[key], atol=1e-4 * scale, rtol=1e-3), key


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k in ("test_loss", "val_loss", "val_perplexity", "bleu", "rougeL")}


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_ray_sweep_equals_the_local_sweep(mode: str, cluster: Any, world: dict[str, Any]) -> None:
    registry: Registry = world["registry"]
    sweep_id = f"sw-ray-{mode}"
    # Concurrent mode: one point per group, so the two groups run as two tasks on the two worker slots.
    rows = _sweep(registry, _recipe(world["data"], world["root"] / "runs"), sweep_id, [1, 4], mode,
                  ExecutorOptions("ray", group_size=1))
    assert rows.keys() == world["local"].keys()
    sweep_dir = world["root"] / "runs" / sweep_id
    for rank, row in rows.items():
        local = world["local"][rank]
        _same_adapter(registry, row["adapter"], local["adapter"], exact=mode == "sequential")
        for key, value in _metrics(local).items():
            assert row[key] == pytest.approx(value, rel=1e-6 if mode == "sequential" else 1e-3), (rank, key)
        assert registry.resolve(f"{registry.resolve(row['adapter']).name}:{sweep_id}").ref == row["adapter"]
        tried = attempts(sweep_dir, _point(rank))
        assert len(tried) == 1 and tried[0]["pid"] != os.getpid()  # trained once, in a Ray worker


def _point(rank: int, seed: int = 3) -> SweepPoint:
    return SweepPoint(rank, seed, 8.0, False, "unused")


def test_a_worker_killed_mid_task_is_retried(cluster: Any, world: dict[str, Any]) -> None:
    registry: Registry = world["registry"]
    sweep_dir = world["root"] / "runs-kill" / "sw-kill"
    killed: list[int] = []

    def kill_first_attempt() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tried = attempts(sweep_dir, _point(4))
            if tried:
                os.kill(int(tried[0]["pid"]), signal.SIGKILL)
                killed.append(int(tried[0]["pid"]))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_attempt, daemon=True)
    killer.start()
    rows = _sweep(registry, _recipe(world["data"], world["root"] / "runs-kill"), "sw-kill", [4], "sequential", RAY)
    killer.join(timeout=5)
    tried = attempts(sweep_dir, _point(4))
    assert killed and len(tried) == 2 and tried[0]["pid"] == killed[0] != tried[1]["pid"]
    _same_adapter(registry, rows[4]["adapter"], world["local"][4]["adapter"], exact=True)
    assert _registered_by(registry, "tgen-r4", "sw-kill") == [rows[4]["adapter"]]  # registered once


def test_resume_from_local_to_ray_and_from_ray_to_local(cluster: Any, world: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterhub_local.train import runner

    registry: Registry = world["registry"]
    runs = world["root"] / "runs-resume"
    real_run = runner.run
    local_calls: list[int] = []

    def interrupted_at_r4(recipe_: Recipe, *args: Any, **kwargs: Any) -> Any:
        local_calls.append(recipe_.method.r)
        if recipe_.method.r == 4:
            raise KeyboardInterrupt
        return real_run(recipe_, *args, **kwargs)

    # Local first, interrupted at r=4; Ray finishes it, training only r=4.
    monkeypatch.setattr(runner, "run", interrupted_at_r4)
    recipe = _recipe(world["data"], runs, "tres")
    with pytest.raises(KeyboardInterrupt):
        _sweep(registry, recipe, "sw-l2r", [1, 4], "sequential", ExecutorOptions())
    first_r1 = registry.resolve("tres-r1:sw-l2r").ref
    rows = _sweep(registry, recipe, "sw-l2r", [1, 4], "sequential", RAY)
    assert local_calls == [1, 4]
    assert rows[1]["adapter"] == first_r1 and not attempts(runs / "sw-l2r", _point(1))
    assert len(attempts(runs / "sw-l2r", _point(4))) == 1
    _same_adapter(registry, rows[4]["adapter"], world["local"][4]["adapter"], exact=True)

    # Ray first, its driver interrupted once the first point is recorded; the local executor finishes it.
    def stop_after_first(line: str) -> None:
        if "→" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(registry, recipe, "sw-r2l", [1, 4], "sequential", RAY, log=stop_after_first)
    state = json.loads((runs / "sw-r2l" / "state.json").read_text())
    assert len(state["results"]) == 1  # one point recorded by the Ray run
    local_calls.clear()

    def run_locally(recipe_: Recipe, *args: Any, **kwargs: Any) -> Any:
        local_calls.append(recipe_.method.r)
        return real_run(recipe_, *args, **kwargs)

    monkeypatch.setattr(runner, "run", run_locally)
    rows = _sweep(registry, recipe, "sw-r2l", [1, 4], "sequential", ExecutorOptions())
    assert len(local_calls) <= 1  # at most the point whose Ray task was cancelled; never the recorded one
    for rank in (1, 4):
        _same_adapter(registry, rows[rank]["adapter"], world["local"][rank]["adapter"], exact=True)
        assert _registered_by(registry, f"tres-r{rank}", "sw-r2l") == [rows[rank]["adapter"]]  # never twice


def _registered_by(registry: Registry, name: str, sweep_id: str) -> list[str]:
    """Every version of ``name`` a run of sweep ``sweep_id`` registered."""
    cards = [registry.card_of(name, row.version) for row in registry.list_adapters(name)]
    return [c.ref for c in cards if c.recipe.get("output", {}).get("tag") == sweep_id]
