"""Building blocks for the registry attack catalogue: a tiny base registered once per module, hand-made
PEFT directories (valid by default, every part overridable) and raw safetensors files with any header."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from adapterhub_local.registry import Registry

HIDDEN = 32
PREFIX = "base_model.model.model.layers.0.self_attn"
# tiny Llama: q_proj [32, 32], v_proj [16, 32] (2 KV heads × head_dim 8)
OUT = {"q_proj": 32, "v_proj": 16}


def raw_safetensors(path: Path, header: dict[str, Any], data: bytes, header_bytes: bytes | None = None) -> Path:
    """Write a safetensors file with exactly this header (or these header bytes) and data region."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def lora_tensors(rank: int = 4, modules: tuple[str, ...] = ("q_proj", "v_proj"), dtype: str = "F32",
                 seed: int = 0) -> dict[str, tuple[str, list[int], bytes]]:
    """name → (dtype, shape, little-endian bytes) of a valid LoRA state dict for the tiny Llama."""
    rng = np.random.default_rng(seed)
    np_dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
    out: dict[str, tuple[str, list[int], bytes]] = {}
    for module in modules:
        for part, shape in (("lora_A", [rank, HIDDEN]), ("lora_B", [OUT[module], rank])):
            values = rng.standard_normal(shape)
            if dtype == "BF16":
                raw = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
            else:
                raw = values.astype(np_dtype[dtype]).tobytes()
            out[f"{PREFIX}.{module}.{part}.weight"] = (dtype, shape, raw)
    return out


def write_tensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]],
                  metadata: dict[str, Any] | None = None) -> Path:
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    return raw_safetensors(path, header, data)


def lora_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                              "task_type": "CAUSAL_LM", "bias": "none", "use_dora": False, "fan_in_fan_out": False}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not DROP}


DROP = object()
"""Pass as an override to remove a config key."""


def adapter_dir(directory: Path, config: dict[str, Any] | None = None,
                tensors: dict[str, tuple[str, list[int], bytes]] | None = None) -> Path:
    """A PEFT LoRA directory for the tiny Llama (valid unless told otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / "adapter_model.safetensors", lora_tensors() if tensors is None else tensors)
    (directory / "adapter_config.json").write_text(json.dumps(lora_config() if config is None else config))
    return directory


def assert_nothing_published(registry: Registry, name: str) -> None:
    """A refused import leaves no version, no name directory, no staging leftovers and no index row."""
    assert registry.versions_on_disk(name) == []
    assert not (registry.root / "adapters" / name).exists()
    staging = registry.root / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert [r for r in registry.list_adapters() if r.name == name] == []
