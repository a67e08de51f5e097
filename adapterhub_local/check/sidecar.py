"""Parity results kept beside the registry's immutable versions: an append-only sidecar per content hash.

A version directory (and its ``card.json``) never changes after publication, and the card is not where
results that arrive later can go. So each ``adapterhub check`` appends one JSON line to
``<registry>/.checks/<content_hash>.jsonl``:

* keyed by the **content hash** (the version's bytes), not by name: a check is a fact about those bytes on
  a base, so a deleted-and-reimported copy keeps it, and a retagged name cannot inherit another's result;
* **append-only**: a new check never erases an earlier one (the history shows when a regression began);
  each append rewrites the file atomically under the registry's writer lock, so a reader sees the old
  lines or the old lines plus the new one, never a torn line;
* **untrusted on read**: each line is parsed strictly; a malformed line is skipped and counted, never
  trusted, and never breaks ``show`` or ``/v1/models``;
* outside ``adapters/`` and ``bases/``, so ``verify``'s stray check and the index are unaffected.

A record's ``base_fingerprint`` ties it to the base it ran on: a record for another base is not reported.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_local.registry import AdapterCard, Registry, atomic

CHECKS_DIR = ".checks"
CHECKABLE_KINDS = ("lora", "prompt", "head")
"""Version kinds PEFT can run as a reference (``full`` versions are whole models: nothing to compare)."""
_HASH = re.compile(r"[0-9a-f]{64}", re.ASCII)
MAX_BYTES = 4 << 20
"""A sidecar larger than this is not read (thousands of checks; something else wrote it)."""


@dataclass
class CheckRecord:
    """One parity check of one version: the engine against PEFT on a few prompts of the adapter's task."""

    ref: str
    content_hash: str
    base: str
    base_fingerprint: str
    dtype: str
    device: str
    prompts: int
    tolerance: float
    """The largest logit difference allowed for ``dtype`` (relative to the reference logits' scale)."""
    max_logit_diff: float
    """The largest |engine − PEFT| logit over every path and prompt."""
    greedy_agreement: float
    """Fraction of greedy tokens (classifiers: predicted labels) equal to PEFT's, over every decoding path."""
    passed: bool
    paths: dict[str, float] = field(default_factory=dict)
    """Per path (``swap``, ``mixed``, ``merge``, ``static`` …): its largest logit difference or agreement."""
    mixed_with: str | None = None
    created: str = ""

    def to_line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_CHECKS: dict[str, Any] = {
    "ref": lambda v: isinstance(v, str), "content_hash": lambda v: isinstance(v, str) and _HASH.fullmatch(v),
    "base": lambda v: isinstance(v, str), "base_fingerprint": lambda v: isinstance(v, str),
    "dtype": lambda v: isinstance(v, str), "device": lambda v: isinstance(v, str),
    "prompts": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "tolerance": _finite, "max_logit_diff": lambda v: _finite(v) and v >= 0,
    "greedy_agreement": lambda v: _finite(v) and 0 <= v <= 1, "passed": lambda v: isinstance(v, bool),
    "paths": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _finite(x) for k, x in v.items()),
    "mixed_with": lambda v: v is None or isinstance(v, str), "created": lambda v: isinstance(v, str),
}


def parse_line(line: str) -> CheckRecord | None:
    """A record from one sidecar line, or ``None`` when the line is not a well-formed record."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != set(_CHECKS):
        return None
    if not all(check(data[key]) for key, check in _CHECKS.items()):
        return None
    return CheckRecord(**data)


def sidecar_path(registry: Registry, content_hash: str) -> Path:
    if not _HASH.fullmatch(content_hash):
        raise ValueError(f"not a content hash: {content_hash!r}")
    return registry.root / CHECKS_DIR / f"{content_hash}.jsonl"


def _read_lines(path: Path) -> list[str]:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_BYTES:
            return []
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def append(registry: Registry, record: CheckRecord) -> None:
    """Add ``record`` to its version's sidecar (earlier lines kept byte for byte)."""
    path = sidecar_path(registry, record.content_hash)
    with registry.locked():
        path.parent.mkdir(exist_ok=True)
        lines = _read_lines(path)
        atomic.write_text_atomic(path, "".join(f"{line}\n" for line in [*lines, record.to_line()]))


@dataclass
class History:
    """A version's checks on its own base, oldest first, and how many sidecar lines could not be read."""

    records: list[CheckRecord]
    unreadable: int = 0

    @property
    def latest(self) -> CheckRecord | None:
        return self.records[-1] if self.records else None


def history(registry: Registry, card: AdapterCard) -> History:
    """Every readable check of ``card``'s bytes on ``card``'s base."""
    lines = [line for line in _read_lines(sidecar_path(registry, card.content_hash)) if line.strip()]
    parsed = [parse_line(line) for line in lines]
    records = [r for r in parsed if r is not None and r.content_hash == card.content_hash
               and r.base_fingerprint == card.base_fingerprint]
    return History(records, sum(r is None for r in parsed))


def summary(registry: Registry, card: AdapterCard) -> dict[str, Any] | None:
    """The latest check as a small dict for ``show`` and ``/v1/models`` (``None``: never checked)."""
    found = history(registry, card)
    latest = found.latest
    if latest is None:
        return None
    out: dict[str, Any] = {"passed": latest.passed, "max_logit_diff": latest.max_logit_diff,
                           "tolerance": latest.tolerance, "greedy_agreement": latest.greedy_agreement,
                           "dtype": latest.dtype, "device": latest.device, "prompts": latest.prompts,
                           "checked": latest.created, "checks": len(found.records)}
    if found.unreadable:
        out["unreadable_lines"] = found.unreadable
    return out
