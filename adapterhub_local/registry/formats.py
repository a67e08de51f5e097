"""Reading and checking the files a registry holds: safetensors (header checked before any tensor is
read), JSON configs, and PEFT adapter directories. Pickle is never deserialized: a ``.bin``/``.pt``
checkpoint is refused with the command that converts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_local.errors import FormatError
from adapterhub_local.registry.safefiles import read_regular
from adapterhub_local.registry.safetensors_check import (
    RESAVE_FIX,
    TensorInfo,
    no_duplicates,
    read_layout,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TensorInfo", "load_tensors", "read_json", "read_safetensors_header",
           "refuse_pickle_dir", "save_tensors"]

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

PICKLE_FIX = (
    "convert it to safetensors in a trusted environment, e.g. "
    "`python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"`, "
    "then import the directory again"
)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and strictly check a safetensors header without reading tensor data (see
    :mod:`~adapterhub_local.registry.safetensors_check`); raises :class:`FormatError` naming the file."""
    return read_layout(path).tensors()


def _resave_fix() -> str:
    return RESAVE_FIX


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header; clear error on any damage."""
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise FormatError(f"{path}: cannot load safetensors ({exc})", _resave_fix()) from exc


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, detached, on CPU) as safetensors."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata=metadata)


def parse_json_object(data: bytes, path: Path | str, what: str,
                      fix: str = "fix or regenerate the file") -> dict[str, Any]:
    """Parse untrusted bytes as one JSON object (duplicate keys refused; callers range-check numbers). Errors
    name ``what`` and ``path`` (a file, or any location such as a bucket key; ``what`` may be empty)."""
    where = f"{what} {path}" if what else str(path)
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{where} is not valid JSON ({exc})", fix) from exc
    if not isinstance(value, dict):
        raise FormatError(f"{where} is not a JSON object", fix)
    return value


def read_json(path: Path, what: str = "JSON file", fix: str = "fix or regenerate the file") -> dict[str, Any]:
    """Read a JSON object from a regular file, raising :class:`FormatError` with the file named on any
    problem (missing, a FIFO or device, a symlink leaving its directory, not JSON, not an object)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FormatError(f"{what} {path} is missing", "point at a directory that contains it")
    return parse_json_object(read_regular(path, path.parent, follow_inside=True, fix=fix), path, what, fix)


def refuse_pickle_dir(directory: Path) -> None:
    """Raise if ``directory`` holds only pickle weights where safetensors are needed."""
    pickles = sorted(p.name for p in Path(directory).iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FormatError(
            f"{directory} holds pickle weights ({', '.join(pickles)}) and no safetensors; "
            "pickle is never loaded because it can run arbitrary code",
            PICKLE_FIX,
        )
