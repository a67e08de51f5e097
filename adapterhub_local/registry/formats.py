"""Reading and checking the files a registry holds: safetensors (header checked before any tensor is
read), JSON configs, and PEFT adapter directories. Pickle is never deserialized: a ``.bin``/``.pt``
checkpoint is refused with the command that converts it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapterhub_local.errors import FormatError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}

PICKLE_FIX = (
    "convert it to safetensors in a trusted environment, e.g. "
    "`python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"`, "
    "then import the directory again"
)


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading tensor data.

    Checks: length prefix sane, header is a JSON object, every entry has dtype/shape/offsets, offsets lie
    inside the file and agree with dtype×shape. Raises :class:`FormatError` naming the file otherwise.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)", _resave_fix())
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > _MAX_HEADER or 8 + header_len > size:
                raise FormatError(f"{path}: malformed safetensors header (length {header_len})", _resave_fix())
            raw = handle.read(header_len)
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror}", "check the path and permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: malformed safetensors header (not JSON: {exc})", _resave_fix()) from exc
    if not isinstance(header, dict):
        raise FormatError(f"{path}: malformed safetensors header (not an object)", _resave_fix())
    data_len = size - 8 - header_len
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: malformed safetensors entry {name!r}", _resave_fix()) from exc
        numel = 1
        for dim in shape:
            numel *= dim
        width = _DTYPE_BYTES.get(dtype)
        if width is None or not 0 <= start <= end <= data_len or (end - start) != numel * width:
            raise FormatError(
                f"{path}: safetensors entry {name!r} has inconsistent dtype/shape/offsets", _resave_fix()
            )
        out[name] = TensorInfo(dtype=dtype, shape=shape)
    return out


def _resave_fix() -> str:
    return "the file is damaged or not safetensors; re-export it with safetensors' save_file"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header; clear error on any damage."""
    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise FormatError(f"{path}: cannot load safetensors ({exc})", _resave_fix()) from exc


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, detached, on CPU) as safetensors."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata=metadata)


def read_json(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """Read a JSON object, raising :class:`FormatError` with the file named on any problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FormatError(f"{what} {path} is missing", "point at a directory that contains it") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{what} {path} is not valid JSON ({exc})", "fix or regenerate the file") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{what} {path} is not a JSON object", "fix or regenerate the file")
    return data


def refuse_pickle_dir(directory: Path) -> None:
    """Raise if ``directory`` holds only pickle weights where safetensors are needed."""
    pickles = sorted(p.name for p in Path(directory).iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FormatError(
            f"{directory} holds pickle weights ({', '.join(pickles)}) and no safetensors; "
            "pickle is never loaded because it can run arbitrary code",
            PICKLE_FIX,
        )
