"""Strict safetensors parsing: every header field type-checked, the data region exactly tiled by the
tensors (no gaps, no overlaps, no bytes past the last tensor), and — for adapters — every value
floating point and finite.

The header is checked before any tensor byte is read; the value check reads tensor bytes through a
read-only ``mmap`` (no copy, no pickle, no torch), testing the IEEE exponent bits of each element.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from adapterhub_local.errors import FormatError

MAX_HEADER = 100 * 1024 * 1024
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8,
}
# Floating dtypes an adapter may hold: (unsigned view, exponent mask). All-ones exponent = inf/NaN.
FLOAT_EXPONENT = {
    "F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}
RESAVE_FIX = "the file is damaged or not safetensors; re-export it with safetensors' save_file"


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One tensor's header entry with its byte span in the data region."""

    name: str
    info: TensorInfo
    start: int
    end: int


@dataclass(frozen=True)
class Layout:
    """A checked safetensors header: entries in file order, metadata, and where the data region starts."""

    entries: list[Entry]
    metadata: dict[str, str]
    data_start: int

    def tensors(self) -> dict[str, TensorInfo]:
        return {e.name: e.info for e in self.entries}


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_layout(handle: BinaryIO, size: int, where: str) -> Layout:
    """Parse and check the header of an open safetensors file of ``size`` bytes."""
    def bad(problem: str) -> FormatError:
        return FormatError(f"{where}: malformed safetensors file ({problem})", RESAVE_FIX)

    prefix = handle.read(8)
    if len(prefix) < 8:
        raise bad("shorter than 8 bytes")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len < 2 or header_len > MAX_HEADER or 8 + header_len > size:
        raise bad(f"header length {header_len} does not fit a {size}-byte file")
    raw = handle.read(header_len)
    if len(raw) != header_len:
        raise bad("header truncated")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    entries = [_entry(name, value, bad) for name, value in header.items()]
    cursor = 0
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            what = "overlaps another tensor" if entry.start < cursor else "leaves a gap before it"
            raise bad(f"tensor {entry.name!r} {what} (offset {entry.start}, expected {cursor})")
        cursor = entry.end
    if cursor != data_len:
        problem = "runs past the end of the file" if cursor > data_len else "has trailing bytes after the last tensor"
        raise bad(f"data region {problem} ({cursor} bytes used of {data_len})")
    return Layout(entries=entries, metadata=metadata, data_start=8 + header_len)


def _entry(name: str, value: Any, bad: Any) -> Entry:
    if not name:
        raise bad("empty tensor name")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"entry {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"entry {name!r} has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"entry {name!r} has data_offsets that are not two integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise bad(f"entry {name!r} has offsets {offsets} out of order")
    numel = 1
    for dim in shape:
        numel *= dim
    if end - start != numel * DTYPE_BYTES[dtype]:
        raise bad(f"entry {name!r}: shape {shape} × {dtype} is {numel * DTYPE_BYTES[dtype]} bytes, "
                  f"but its offsets span {end - start}")
    return Entry(name=name, info=TensorInfo(dtype=dtype, shape=tuple(shape)), start=start, end=end)


def read_layout(path: Path) -> Layout:
    """Parse and check the header of the safetensors file at ``path`` (no tensor data read)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return parse_layout(handle, path.stat().st_size, str(path))
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror}", "check the path and permissions") from exc


def value_problems(path: Path, layout: Layout) -> list[str]:
    """Tensors that are not floating point or hold inf/NaN (one line per tensor)."""
    problems: list[str] = []
    non_float = sorted(e.name for e in layout.entries if e.info.dtype not in FLOAT_EXPONENT)
    if non_float:
        dtypes = sorted({e.info.dtype for e in layout.entries if e.name in non_float})
        problems.append(f"tensors {non_float[:4]} have dtype {'/'.join(dtypes)}; adapter weights must be "
                        "F32, F16, BF16 or F64")
    spans = [e for e in layout.entries if e.info.dtype in FLOAT_EXPONENT and e.end > e.start]
    if not spans:
        return problems
    with Path(path).open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        data = np.frombuffer(mapped, dtype=np.uint8)
        raw = bits = data[:0]
        try:
            for entry in spans:
                view, mask = FLOAT_EXPONENT[entry.info.dtype]
                raw = data[layout.data_start + entry.start : layout.data_start + entry.end]
                bits = raw.view(np.dtype(view))
                bad = int(np.count_nonzero((bits & np.array(mask, dtype=bits.dtype)) == mask))
                if bad:
                    problems.append(f"tensor {entry.name!r} holds {bad} non-finite value(s) (inf/NaN)")
        finally:
            del data, raw, bits  # release the buffer before the mmap closes
    return problems
