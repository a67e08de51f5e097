"""Base fingerprints: stable, sensitive to every weight byte, cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapterhub_local.registry import fingerprint as fp


def test_cached_second_call_does_not_rehash(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = fp.fingerprint(tiny_llama_dir)
    monkeypatch.setattr(fp, "compute_fingerprint", lambda _: pytest.fail("recomputed despite cache"))
    assert fp.fingerprint(tiny_llama_dir) == first


def test_independent_of_tensor_order_and_copy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    weights = copy / "model.safetensors"
    tensors = load_file(str(weights))
    save_file(dict(reversed(list(tensors.items()))), str(weights))
    assert fp.compute_fingerprint(copy) == fp.compute_fingerprint(tiny_llama_dir)


def test_one_weight_change_changes_fingerprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    before = fp.fingerprint(copy)
    tensors = load_file(str(copy / "model.safetensors"))
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(copy / "model.safetensors"))
    assert fp.fingerprint(copy) != before  # the cache notices the new size/mtime
