"""Several processes writing at once, writers mixed with deletes, tags and gc (issue 10 item 12), and
writers killed with SIGKILL at random points (fault injection): afterwards ``verify`` passes, the index
agrees with the directories, and no version number was ever handed out twice — on both back ends (issue
16; on S3 each process has its own cache, as on separate machines, and fewer processes and operations run
against the one-request-at-a-time test server)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapterhub_local.registry import Registry
from adapterhub_local.registry.maintenance import collect_garbage, verify
from adapterhub_local.registry.objectstore import ObjectStoreRegistry
from tests.registry.backends import Backend, local_only

WRITER = """
import sys
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.objectstore import ObjectStoreRegistry, is_remote
root, source, count, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
registry = ObjectStoreRegistry(root, create=False) if is_remote(root) else Registry(root)
for i in range(count):
    registry.register_adapter("shared", source, "tiny", CardInfo(task=f"{tag}-{i}"))
"""


def _adapter_dir(tmp_path: Path, hidden: int, rank: int) -> Path:
    """A LoRA directory for the tiny Llama's q_proj of layer 0 (hidden × hidden)."""
    directory = tmp_path / f"adapter-r{rank}"
    directory.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = torch.randn(rank, hidden), torch.randn(hidden, rank)
    tensors = {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(
        f'{{"peft_type": "LORA", "r": {rank}, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}}'
    )
    return directory


def _env(tmp_path: Path, who: str) -> dict[str, str]:
    """A process's environment: on S3 its own cache (another machine); the server's address is inherited."""
    return {**os.environ, "ADAPTERHUB_CACHE": str(tmp_path / f"cache-{who}")}


def _spawn(location: str | Path, source: Path, count: int, tag: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(location), str(source), str(count), tag],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(tmp_path, tag))


@pytest.fixture
def shared(backend: Backend, tiny_llama_dir: Path) -> Backend:
    backend.registry.add_base("tiny", str(tiny_llama_dir))
    return backend


def test_eight_writers_lose_nothing(shared: Backend, tmp_path: Path) -> None:
    writers, each = (3, 4) if shared.is_s3 else (8, 25)
    source = _adapter_dir(tmp_path, hidden=32, rank=4)
    procs = [_spawn(shared.location, source, each, f"w{i}", tmp_path) for i in range(writers)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    reader = shared.fresh()
    rows = reader.list_adapters("shared")
    assert [r.version for r in rows] == list(range(1, writers * each + 1))
    tasks = {reader.resolve(f"shared@{r.version}").task for r in rows}
    assert tasks == {f"w{w}-{i}" for w in range(writers) for i in range(each)}  # every write landed exactly once
    report = verify(reader)
    assert report.ok and len(report.checked) == writers * each


@local_only("kills land inside local file writes; on S3: test_objectstore's writer killed mid-publish, and "
            "the fault injection below")
def test_sigkill_mid_write_leaves_no_partial_version(backend: Backend, tiny_llama_dir: Path, tmp_path: Path) -> None:
    llama_registry = backend.registry
    llama_registry.add_base("tiny", str(tiny_llama_dir))
    # Rank 32 on a 32-wide model is small; use a bigger file so kills land inside the write.
    source = _adapter_dir(tmp_path, hidden=32, rank=32)
    versions_dir = llama_registry.root / "adapters/shared"
    for delay in (0.01, 0.07, 0.2):
        writer = _spawn(llama_registry.root, source, 10_000, f"k{delay}", tmp_path)
        seen = len(list(versions_dir.glob("[0-9]*"))) if versions_dir.exists() else 0
        deadline = time.monotonic() + 60
        while (len(list(versions_dir.glob("[0-9]*"))) if versions_dir.exists() else 0) <= seen:
            assert time.monotonic() < deadline, "writer never wrote"
            time.sleep(0.01)
        time.sleep(delay)  # now it is writing steadily: kill it somewhere inside a write
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        report = verify(llama_registry)
        assert report.ok, report.problems
        for row in llama_registry.list_adapters("shared"):
            directory = llama_registry.root / "adapters/shared" / str(row.version)
            assert sorted(p.name for p in directory.iterdir()) == [
                "adapter_config.json", "adapter_model.safetensors", "card.json"]
    before = max(row.version for row in llama_registry.list_adapters("shared"))
    card = llama_registry.register_adapter("shared", source, "tiny")
    assert card.version > before  # numbers a killed writer had claimed stay used: never handed out twice
    collect_garbage(llama_registry)
    assert not any((llama_registry.root / ".staging").iterdir())


REPO = Path(__file__).resolve().parents[2]


def _worker(location: str, source: Path, seed: int, ops: int, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.registry.registry_worker", location, str(source), str(seed),
                             str(ops)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path, f"s{seed}"))


def _events(text: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _assert_consistent(registry: Registry) -> None:
    """verify passes, every version is complete, and the healed index equals the directories."""
    report = verify(registry)
    assert report.ok, report.problems
    on_disk = {(n, v) for n in registry.adapter_names() for v in registry.versions_on_disk(n)}
    for name, version in on_disk:
        assert sorted(p.name for p in (registry.root / "adapters" / name / str(version)).iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "card.json"]
    raw = {(r.name, r.version) for r in registry.index.rows()}
    assert len(raw ^ on_disk) <= 1  # at most the one operation a kill interrupted
    assert {(r.name, r.version) for r in registry.list_adapters()} == on_disk
    assert {(r.name, r.version) for r in registry.index.rows()} == on_disk
    for name in registry.adapter_names():
        assert registry.layout.next_version(name) > max(registry.versions_on_disk(name), default=0)
    if isinstance(registry, ObjectStoreRegistry):  # the client's cache holds exactly what the store does
        assert not registry.remote_problems
        for name in {n for n, _ in on_disk} | set(registry.adapter_names()):
            assert registry.versions_on_disk(name) == registry.remote_versions(name)


def test_eight_processes_mixing_writes_deletes_tags_and_gc(shared: Backend, tmp_path: Path) -> None:
    workers, ops = (3, 10) if shared.is_s3 else (8, 30)
    source = _adapter_dir(tmp_path, hidden=32, rank=4)
    procs = [_worker(shared.location, source, seed, ops, tmp_path) for seed in range(workers)]
    events: list[dict[str, str]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in err, err
        events += _events(out)
    imported = [e["ref"] for e in events if e["op"] == "import" and "error" not in e]
    deleted = [e["ref"] for e in events if e["op"] == "delete" and "ref" in e and "error" not in e]
    assert len(imported) == len(set(imported)) >= workers * ops // 6  # no number handed out twice
    assert set(deleted) <= set(imported) and len(deleted) == len(set(deleted))  # each delete succeeded once
    reader = shared.fresh()
    reader.list_adapters()  # a sync point
    on_disk = {f"{n}@{v}" for n in reader.adapter_names() for v in reader.versions_on_disk(n)}
    assert on_disk == set(imported) - set(deleted)  # a delete that reported failure deleted nothing
    assert {e.get("error") for e in events} <= {None, "NotFoundError"}
    _assert_consistent(reader)


def test_fault_injection_kill_a_mixed_writer_at_random_points(shared: Backend, tmp_path: Path) -> None:
    source = _adapter_dir(tmp_path, hidden=32, rank=8)
    rng = random.Random(20261130)
    llama_registry = shared.fresh()  # S3: a reader of its own; it syncs in verify and every listing
    kills = 0
    while kills < (4 if shared.is_s3 else 24):
        worker = _worker(shared.location, source, 100 + kills, -1, tmp_path)
        assert worker.stdout is not None
        worker.stdout.readline()  # it has finished one operation: now it is in full swing
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=30)
        kills += 1
        _assert_consistent(llama_registry)
    collect_garbage(llama_registry, min_age_s=0)
    assert not any((llama_registry.root / ".staging").iterdir()) and not llama_registry.layout.temp_files()
    for name, _tag, version in [] if shared.is_s3 else llama_registry.tags():  # gc pruned tags a killed delete
        assert version in llama_registry.versions_on_disk(name)  # left dangling (S3: gc cleans the cache only)
    highest = max((v for n in llama_registry.adapter_names() for v in llama_registry.versions_on_disk(n)), default=0)
    assert llama_registry.register_adapter("alpha", source, "tiny").version > min(highest, 1) - 1
    _assert_consistent(llama_registry)
