"""Base-model fingerprints: sha256 over the model config, the tensor names/shapes/dtypes, and every
weight byte, in a canonical order (so sharding or tensor order in a file does not change it).

Computing it reads every weight byte, so the result is cached next to the weights, keyed by each
file's size and modification time; a second call costs a few ``stat`` calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError
from adapterhub_local.registry.formats import read_safetensors_header

CACHE_FILE = ".fingerprint.json"
# Fields that change with the library that wrote the config, not with the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash"}
_CHUNK = 8 * 1024 * 1024


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, sorted by name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir} holds no *.safetensors weights", "convert the model to safetensors")
    return files


def canonical_config(model_dir: Path) -> dict[str, Any]:
    """The model config minus fields that record the writing library rather than the model."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read model config {path}: {exc}", "a base needs a valid config.json") from exc
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def _signature(files: list[Path], model_dir: Path) -> list[list[Any]]:
    sig: list[list[Any]] = []
    for path in [Path(model_dir) / "config.json", *files]:
        stat = path.stat()
        sig.append([path.name, stat.st_size, stat.st_mtime_ns])
    return sig


def compute_fingerprint(model_dir: Path) -> str:
    """Hash config + tensor listing + weight bytes (no cache)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    digest.update(json.dumps(canonical_config(model_dir), sort_keys=True).encode())
    entries: list[tuple[str, Path]] = []
    headers = {}
    for path in weight_files(model_dir):
        header = read_safetensors_header(path)
        headers[path] = header
        entries.extend((name, path) for name in header)
    entries.sort()
    for name, path in entries:
        info = headers[path][name]
        digest.update(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())
    for name, path in entries:
        _hash_tensor_bytes(digest, path, name)
    return digest.hexdigest()


def _hash_tensor_bytes(digest: Any, path: Path, name: str) -> None:
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        start, end = header[name]["data_offsets"]
        handle.seek(8 + header_len + start)
        remaining = end - start
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                raise FormatError(f"{path} is truncated", "re-register the base model")
            digest.update(chunk)
            remaining -= len(chunk)


def fingerprint(model_dir: Path) -> str:
    """Cached fingerprint: recomputed only when a weight file's size or mtime changed."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    signature = _signature(files, model_dir)
    cache = model_dir / CACHE_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("signature") == signature and isinstance(cached.get("fingerprint"), str):
            return str(cached["fingerprint"])
    except (OSError, json.JSONDecodeError):
        pass
    value = compute_fingerprint(model_dir)
    tmp = cache.with_name(f"{CACHE_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"signature": signature, "fingerprint": value}))
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only model dir just means no cache
    return value


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name → shape across a model directory's safetensors files."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(Path(model_dir)):
        shapes.update({name: info.shape for name, info in read_safetensors_header(path).items()})
    return shapes
