"""Multi-process training (``train/distributed.py``): two CPU processes over gloo, started through the real
``accelerate launch … -m adapterhub_local train`` command (DDP, ``--multi_gpu``; FSDP2, ``--use_fsdp --fsdp_version
2``), train the adapter one process trains with the same global batch and register it once; a run cut under one
number of processes resumes under another to the same adapter; shards and loss shares restore the one-process loss;
a dead or hung process fails the others within the timeout; launches that would not do what they say are refused."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adapterhub_local.cli import main
from adapterhub_local.errors import ConfigError, DistributedError, UnsupportedError
from adapterhub_local.registry import Registry
from adapterhub_local.train import distributed, sharding
from adapterhub_local.train.distributed import Processes
from tests.conftest import make_tiny_bert, make_tiny_llama
from tests.train.conftest import (
    build_recipe,
    classification_rows,
    cls_raw,
    gen_raw,
    generation_rows,
    save_tokenizer,
    write_jsonl,
)

ATOL = 1e-5
"""fp32: the two runs differ only in summation order (the shards' losses are added by the all-reduce)."""
EXECUTION_FACTS = ("train_seconds", "tokens_per_s", "wall_time_s", "peak_memory_mb", "threads", "processes",
                   "strategy")
"""What may differ between a 1-process and a 2-process card: timing, memory and how the run was executed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(a: Any, b: Any, where: str = "") -> None:
    """Equal dicts/lists/strings, numbers within a relative 1e-4 (metrics of adapters 1e-6 apart)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a, b)
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, str):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6, nan_ok=True), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _card(registry: Registry, ref: str) -> dict[str, Any]:
    card = json.loads((registry.path_of(registry.resolve(ref)) / "card.json").read_text())
    for key in ("created", "files", "name", "version"):
        card.pop(key)
    for key in EXECUTION_FACTS:
        card["training"].pop(key)
    card["extra"].pop("run_dir")
    return card


def _registry_without_dropout(root: Path, kind: str) -> tuple[Registry, str]:
    """A registry holding a tiny Llama or BERT (with the test tokenizer) whose own dropout is off: dropout draws
    different masks in 2 processes (the same law, not the same numbers)."""
    directory = make_tiny_llama(root / "tiny-llama") if kind == "gen" else make_tiny_bert(root / "tiny-bert")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update({k: 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")
                   if k in config})
    config_file.write_text(json.dumps(config))
    save_tokenizer(directory)
    registry = Registry(root / "registry")
    name = "tllama" if kind == "gen" else "tbert"
    registry.add_base(name, str(directory))
    return registry, name


LAUNCH_FLAGS = {"ddp": ["--multi_gpu"], "fsdp": ["--use_fsdp", "--fsdp_version", "2"]}
"""How a user picks the strategy: Accelerate's own flags (DDP; FSDP2, which shards the model across the processes)."""


def _launch_command(strategy: str, processes: int, registry: Registry, recipe: Path, *extra: str) -> list[str]:
    """``accelerate launch … -m adapterhub_local train RECIPE`` with ``processes`` processes of ``strategy``."""
    return [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH_FLAGS[strategy], "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "adapterhub_local",
            "-R", str(registry.root), "--verbose", "train", str(recipe), "--no-check", "--json", *extra]


def _launch(strategy: str, processes: int, registry: Registry, recipe: Path, cwd: Path,
            *extra: str) -> subprocess.CompletedProcess[str]:
    """Run :func:`_launch_command` to its end, CPU processes over gloo."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60",
           "ACCELERATE_DISABLE_RICH": "1"}
    return subprocess.run(_launch_command(strategy, processes, registry, recipe, *extra), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


KINDS = {"dora+modules+tokens": {"use_dora": True, "modules_to_save": ["lm_head"], "trainable_tokens": [5, 6]}}
"""LoRA variants whose extra tensors (DoRA magnitudes, a trained copy of the head, embedding rows) are sharded too."""


@pytest.mark.parametrize(("strategy", "kind", "variant"), [
    ("ddp", "gen", None), ("ddp", "cls", None), ("fsdp", "gen", None), ("fsdp", "cls", None),
    ("fsdp", "gen", "dora+modules+tokens")])
def test_two_processes_train_the_adapter_one_process_trains(tmp_path: Path, strategy: str, kind: str,
                                                            variant: str | None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    one, base = _registry_without_dropout(tmp_path / "one", kind)
    data = write_jsonl(tmp_path / "data.jsonl", generation_rows() if kind == "gen" else classification_rows())
    raw = (gen_raw if kind == "gen" else cls_raw)(data, tmp_path / "runs")
    raw["method"]["dropout"] = 0.0  # LoRA dropout off too
    raw["method"].update(KINDS.get(variant or "", {}))
    # 13 examples in batches of 4 (rows split 2 + 2 and, last, 1 + a stand-in), 2 micro-batches per step, 2 epochs;
    # generation rows of unequal completion lengths, so the two shards hold unequal token counts.
    raw["data"]["max_train_examples"] = 13
    raw["train"].update({"batch_size": 4, "grad_accum": 2, "max_steps": 4, "eval_every": 2, "group_by_length": True})
    if kind == "cls":  # mean pooling leaves LoRA on the pooler's dense layer out of the loss: DDP must not wait for it
        raw["task"]["pooling"] = "mean"
        raw["method"]["target_modules"] = ["query", "value", "dense"]
    name = raw["name"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    two = Registry(tmp_path / "registry-2")
    two.add_base(base, str(one.base(base).path))

    assert main(["-R", str(one.root), "train", str(recipe), "--no-check", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    done = _launch(strategy, 2, two, recipe, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads(done.stdout)  # one JSON summary: only the main process reports

    assert [row.version for row in two.list_adapters(name)] == [1]  # registered once
    assert double["training"]["processes"] == 2 and single["training"]["processes"] == 1
    assert double["training"]["strategy"] == strategy and single["training"]["strategy"] == "single"
    assert double["training"]["train_tokens"] == single["training"]["train_tokens"]  # every row trained once
    tensors = [load_file(str(reg.path_of(reg.resolve(f"{name}@1")) / "adapter_model.safetensors"))
               for reg in (one, two)]
    assert tensors[0].keys() == tensors[1].keys()
    for key, value in tensors[0].items():
        torch.testing.assert_close(tensors[1][key], value, rtol=0, atol=ATOL, msg=key)
    assert any(float(v.abs().max()) > 1e-3 for k, v in tensors[0].items() if "lora_B" in k)  # it did train
    _close(_card(one, f"{name}@1"), _card(two, f"{name}@1"))
    logs = [[json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            for r in (single, double)]
    for a, b in zip(*logs, strict=True):  # the logged loss is the global batch's, evaluations the same
        _close({k: v for k, v in a.items() if k != "tokens_per_s"}, {k: v for k, v in b.items() if k != "tokens_per_s"})
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        Path(r["run_dir"]).name for r in (single, double))  # the second process made no run directory of its own


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_split_each_micro_batch_and_their_shares_give_the_one_process_loss(world: int) -> None:
    rng = random.Random(world)
    for _ in range(200):
        rows = rng.sample(range(40), rng.randint(1, 7))
        units = [rng.choice([0, 1, 2, 5, 9]) for _ in range(40)]
        units[rows[0]] = max(units[rows[0]], 1)
        unit_losses = {i: [rng.random() for _ in range(units[i])] for i in range(40)}
        shards = [Processes(world, rank).shard(rows, units) for rank in range(world)]
        for rank, shard in enumerate(shards):  # rows rank, rank + N, … of the micro-batch: disjoint, covering
            mine = rows[rank::world]
            if shard.share > 0:
                assert shard.rows == mine
            else:  # nothing to learn from here: one stand-in row of the micro-batch, weighted 0
                assert sum(units[i] for i in mine) == 0 and len(shard.rows) == 1 and shard.rows[0] in rows

        def mean(indices: list[int], losses: dict[int, list[float]] = unit_losses) -> float:
            values = [v for i in indices for v in losses[i]]
            return sum(values) / len(values)

        # DDP averages the processes' gradients; each process's loss is share × its own mean.
        combined = sum(s.share * mean(s.rows) for s in shards) / world
        assert combined == pytest.approx(mean(rows), rel=1e-12)
    assert Processes().shard([3, 1, 2], [0] * 5).rows == [3, 1, 2]  # alone: the whole micro-batch, share 1


def test_loss_units_count_what_the_models_loss_averages_over() -> None:
    from adapterhub_local.train.tasks import IGNORE, Example

    examples = [Example([1, 2, 3, 4], [IGNORE, IGNORE, 7, 8]), Example([1, 2, 3], [5, 6, IGNORE]), Example([1], 1)]
    assert distributed.loss_units(examples) == [2, 1, 1]
    assert distributed.loss_units(examples, shifted=False) == [2, 2, 1]


def _peer(rank: int, port: int, mode: str, out: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "",
                       distributed.TIMEOUT_ENV: "3"})
    processes = distributed.from_env()
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(30)  # hung: never reaches the collective
        return
    started = time.monotonic()
    try:
        processes.main_says(True)
        out.put(("no error", 0.0))
    except DistributedError as exc:
        out.put((str(exc), time.monotonic() - started))


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_dead_or_hung_process_fails_the_others_within_the_timeout(mode: str) -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_peer, args=(rank, port, mode, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        message, waited = out.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert "process 0 of 2 lost the other training processes" in message, message
    assert "--resume" in message and distributed.TIMEOUT_ENV in message
    assert waited < 10  # the 3 s timeout, not torch's 30 minutes


def _finisher(rank: int, port: int, out: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "",
                       distributed.TIMEOUT_ENV: "20"})
    processes = distributed.from_env()
    processes.main_says(True)  # a collective, as the training's last ones
    if rank == 0:
        time.sleep(1.0)  # the main process registers and checks while the others wait
    entered = time.time()
    processes.finish()
    out.put((rank, entered, time.time(), torch.distributed.is_initialized()))


def test_a_finished_run_waits_for_the_main_process_then_closes_the_process_group() -> None:
    """Every process ends a successful run by waiting for the others and destroying its process group (a process
    that exits with gloo's group alive can abort at interpreter shutdown)."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_finisher, args=(rank, port, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        reports = {rank: (entered, left, alive) for rank, entered, left, alive in (out.get(timeout=60),
                                                                                     out.get(timeout=60))}
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert not reports[0][2] and not reports[1][2]  # both groups destroyed
    assert reports[1][1] >= reports[0][0]  # the other process left only once the main one had finished too
    Processes().finish()  # a single process has nothing to close


def test_launches_that_would_not_do_what_they_say_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == distributed.SINGLE
    # `accelerate launch --cpu --num_processes 2` without mpirun starts one process with these set.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match="--multi_gpu"):
        distributed.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP1, Accelerate's default version: deprecated by torch
    with pytest.raises(UnsupportedError, match="--fsdp_version 2"):
        distributed.from_env()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(UnsupportedError, match="DeepSpeed"):
        distributed.from_env()
    with pytest.raises(UnsupportedError, match=r"method 'prompt'.*precision fp16"):
        sharding.check_supported("prompt", "fp16")
    sharding.check_supported("lora", "bf16")
    with pytest.raises(UnsupportedError, match="one of 2"):
        distributed.require_single("adapterhub sweep")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_s()


class _Stop(KeyboardInterrupt):
    """Ctrl-C at a chosen step (the loop checkpoints the last completed step, as for a real one)."""


def _checkpoint_step(runs: Path) -> int:
    """The step of the newest checkpoint under ``runs`` (-1 when none is complete yet)."""
    steps = [json.loads(p.read_text())["step"] for p in runs.glob("*/checkpoint/state.json")]
    return max(steps, default=-1)


def _kill_after_checkpoint(launch: subprocess.Popen[str], runs: Path, step: int) -> None:
    """SIGTERM (what `kill` or a scheduler's preemption sends) to the launcher and its processes once a checkpoint
    of at least ``step`` is written: a run lost mid-way, at no fixed point."""
    deadline = time.monotonic() + 180
    while _checkpoint_step(runs) < step:
        assert launch.poll() is None, launch.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    os.killpg(launch.pid, signal.SIGTERM)
    try:
        launch.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        launch.communicate()


@pytest.mark.parametrize(("strategy", "before", "after"), [("ddp", 1, 2), ("fsdp", 1, 2), ("fsdp", 2, 1)])
def test_a_run_resumes_under_another_number_of_processes(tmp_path: Path, strategy: str, before: int, after: int,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints hold whole tensors in the one-process layout (optimizer state included) and the step count does
    not depend on N, so a run cut under ``before`` processes continues under ``after`` to the adapter of a straight
    one-process run."""
    straight, base = _registry_without_dropout(tmp_path / "straight", "gen")
    data = write_jsonl(tmp_path / "data.jsonl", generation_rows())
    runs = tmp_path / "runs"
    raw = gen_raw(data, runs)
    raw["method"]["dropout"] = 0.0
    raw["data"]["max_train_examples"] = 13
    # Long enough (30 steps) that a kill after the step-2 checkpoint lands mid-run on a loaded machine.
    steps = 30 if before == 2 else 6
    raw["train"].update({"batch_size": 4, "grad_accum": 2, "max_steps": steps, "eval_every": 2})
    raw["eval"]["forgetting"] = False
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cut = Registry(tmp_path / "registry-cut")
    cut.add_base(base, str(straight.base(base).path))
    assert main(["-R", str(straight.root), "train", str(recipe_file), "--no-check", "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)
    shutil.rmtree(reference["run_dir"])  # leave only the cut run under `runs`

    if before == 1:  # cut at step 3 (between periodic checkpoints), in this process
        from adapterhub_local.train import runner
        from adapterhub_local.train.checks import check

        recipe = build_recipe(raw)

        def interrupt(step: int) -> None:
            if step == 3:
                raise _Stop()

        with pytest.raises(KeyboardInterrupt):
            runner.run(recipe, check(recipe), cut, progress=False, on_step=interrupt)
        assert _checkpoint_step(runs) == 3
        cut_dir = next(runs.iterdir())
        done = _launch(strategy, after, cut, recipe_file, tmp_path, "--resume")
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = json.loads(done.stdout)
    else:  # cut under 2 processes by a signal, at whatever step it lands; resumed in this process
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
        launch = subprocess.Popen(_launch_command(strategy, before, cut, recipe_file), cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        _kill_after_checkpoint(launch, runs, 2)
        run_dirs = list(runs.iterdir())
        assert len(run_dirs) == 1 and not (run_dirs[0] / "final_metrics.json").exists()  # it was cut mid-run
        cut_dir = run_dirs[0]
        assert 2 <= _checkpoint_step(runs) < steps
        capsys.readouterr()
        assert main(["-R", str(cut.root), "train", str(recipe_file), "--no-check", "--json", "--resume"]) == 0
        resumed = json.loads(capsys.readouterr().out)

    assert resumed["training"]["processes"] == after and resumed["training"]["steps"] == steps
    assert Path(resumed["run_dir"]) == cut_dir  # continued there, not started afresh
    tensors = [load_file(str(reg.path_of(reg.resolve(f"{raw['name']}@1")) / "adapter_model.safetensors"))
               for reg in (straight, cut)]
    assert tensors[0].keys() == tensors[1].keys()
    for key, value in tensors[0].items():
        torch.testing.assert_close(tensors[1][key], value, rtol=0, atol=ATOL, msg=key)
    _close(_card(straight, f"{raw['name']}@1"), _card(cut, f"{raw['name']}@1"))
