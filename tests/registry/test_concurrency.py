"""Several processes writing at once, and writers killed with SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterhub_local.registry import Registry
from adapterhub_local.registry.maintenance import collect_garbage, verify

WRITER = """
import sys
from adapterhub_local.registry import CardInfo, Registry
root, source, count, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
registry = Registry(root)
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


def _spawn(root: Path, source: Path, count: int, tag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(source), str(count), tag],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_eight_writers_lose_nothing(llama_registry: Registry, tmp_path: Path) -> None:
    source = _adapter_dir(tmp_path, hidden=32, rank=4)
    writers = [_spawn(llama_registry.root, source, 25, f"w{i}") for i in range(8)]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err.decode()
    rows = llama_registry.list_adapters("shared")
    assert [r.version for r in rows] == list(range(1, 201))
    tasks = {llama_registry.resolve(f"shared@{r.version}").task for r in rows}
    assert tasks == {f"w{w}-{i}" for w in range(8) for i in range(25)}  # every write landed exactly once
    report = verify(llama_registry)
    assert report.ok and len(report.checked) == 200


def test_sigkill_mid_write_leaves_no_partial_version(llama_registry: Registry, tmp_path: Path) -> None:
    # Rank 32 on a 32-wide model is small; use a bigger file so kills land inside the write.
    source = _adapter_dir(tmp_path, hidden=32, rank=32)
    versions_dir = llama_registry.root / "adapters/shared"
    for delay in (0.01, 0.07, 0.2):
        writer = _spawn(llama_registry.root, source, 10_000, f"k{delay}")
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
