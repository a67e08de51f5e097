"""``card.json``: this project's metadata for one adapter version, beside PEFT's own files.

The card records what the adapter is (kind, rank, alpha, targets, task), what it was made on and from
(base fingerprint, resolved recipe, dataset fingerprint, parent), how good it is (metrics), and the
sha256 of every other file in the version directory so damage is detected on load.

A card on disk is untrusted input: every field's type and range is checked, file names must be plain
names (never a path), and a card stored as ``name@N`` must say it is ``name@N``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError, InvalidNameError
from adapterhub_local.registry.formats import read_json
from adapterhub_local.registry.names import validate_name

CARD_FILE = "card.json"
CARD_SCHEMA = 1
WEIGHTS_FILE = "adapter_model.safetensors"
PER_EXAMPLE_KEYS = ("per_example", "test_per_example")
"""Metric entries that hold one record per evaluation example (kept on the card, left out of the index)."""
FULL_WEIGHTS_FILE = "model.safetensors"
"""The weights file of a ``full`` version (a whole transformers model)."""


@dataclass
class CardInfo:
    """What the caller knows about an adapter when registering it (the rest is filled in by the store)."""

    task: str | None = None
    """Task name, e.g. ``sentiment`` or ``e2e``."""
    task_type: str | None = None
    """``causal_lm`` | ``sequence_classification`` | ``feature`` — how to put the adapter to work."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The resolved training recipe (empty for imports)."""
    dataset_fingerprint: str | None = None
    """sha256 of the training data as used."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Evaluation results (accuracy, BLEU …)."""
    parent: str | None = None
    """``name@version`` this adapter was derived from (truncation, continued training)."""
    labels: list[str] | None = None
    """Class labels, in head order, for classifier adapters."""
    training: dict[str, Any] = field(default_factory=dict)
    """Run facts: trainable parameters, wall time, peak memory, tokens/s, forgetting."""
    source: str | None = None
    """Where an imported adapter came from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (e.g. pooling for classifier heads)."""
    composition: dict[str, Any] | None = None
    """For an adapter made by ``adapterhub combine``: ``{"method": ..., "params": {...}, "parents": [{"name",
    "version", "content_hash", "weight"}, ...]}`` (the lineage graph parents → child; the child holds its own
    weights, so deleting a parent never breaks it). ``None`` for every other adapter (and on older cards)."""


@dataclass
class AdapterCard(CardInfo):
    """The full card as stored: caller info plus the facts the store derives."""

    name: str = ""
    version: int = 0
    kind: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    num_virtual_tokens: int | None = None
    base: str = ""
    base_fingerprint: str = ""
    files: dict[str, str] = field(default_factory=dict)
    """File name → sha256 of every file in the version directory except the card."""
    created: str = ""
    schema: int = CARD_SCHEMA

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def content_hash(self) -> str:
        """The identity of this version's bytes: sha256 over the sorted (file name, sha256) pairs of every
        file the card lists (weights *and* config, so equal weights with another alpha differ). Equal
        hashes = equal bytes; caches (the engine's pool) key adapters by it, never by name."""
        return hashlib.sha256(json.dumps(sorted(self.files.items())).encode()).hexdigest()

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file (``adapter_model.safetensors``; ``model.safetensors`` for a full
        fine-tune), or "" if the kind has none."""
        return self.files.get(WEIGHTS_FILE) or self.files.get(FULL_WEIGHTS_FILE, "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> AdapterCard:
        """Build a card from untrusted JSON: unknown fields, wrong types, unsafe file names refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FormatError(f"{where}: unknown card fields {unknown}", f"upgrade adapterhub_local, or {_CARD_FIX}")
        problems = card_problems(data)
        if problems:
            raise FormatError(f"{where}: malformed card: {'; '.join(problems[:6])}", _CARD_FIX)
        return cls(**data)

    @classmethod
    def load(cls, path: Path, name: str | None = None, version: int | None = None) -> AdapterCard:
        """Read a card file; with ``name``/``version`` (a registry version directory), the card must
        describe exactly that version."""
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise FormatError(f"{path} is missing", "the version is torn; delete it and re-register")
        card = cls.from_dict(read_json(path, "card", _CARD_FIX), str(path))
        if name is not None and (card.name, card.version) != (name, version):
            raise FormatError(f"{path} describes {card.name}@{card.version}, not the version {name}@{version} "
                              "it is stored as", _CARD_FIX)
        return card


def merge_info(theirs: AdapterCard, ours: CardInfo) -> CardInfo:
    """What an imported version's card keeps from the card it came with (task, metrics, recipe, lineage
    …): every caller-info field of ``theirs``, overridden by each field ``ours`` sets (non-empty)."""
    merged = CardInfo(**{f.name: getattr(theirs, f.name) for f in fields(CardInfo)})
    for f in fields(CardInfo):
        value = getattr(ours, f.name)
        if value not in (None, {}, []):
            setattr(merged, f.name, value)
    return merged


_CARD_FIX = "restore the version from an export, or delete it and import it again"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _files(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _FILE_NAME.fullmatch(k) is not None and ".." not in k and k != CARD_FILE
        and isinstance(v, str) and _HEX64.fullmatch(v) is not None for k, v in value.items())


def _composition(value: Any) -> bool:
    if not isinstance(value, dict) or set(value) != {"method", "params", "parents"}:
        return False
    if not isinstance(value["method"], str) or not isinstance(value["params"], dict):
        return False
    parents = value["parents"]
    return isinstance(parents, list) and len(parents) >= 1 and all(
        isinstance(p, dict) and set(p) == {"name", "version", "content_hash", "weight"}
        and _safe_name(p["name"]) and _is_int(p["version"]) and p["version"] >= 1
        and isinstance(p["content_hash"], str) and _HEX64.fullmatch(p["content_hash"]) is not None
        and _number(p["weight"]) for p in parents)


def _safe_name(value: Any) -> bool:
    try:
        validate_name(value)
    except InvalidNameError:
        return False
    return True


_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "task_type": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "recipe": (lambda v: isinstance(v, dict), "an object"),
    "dataset_fingerprint": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
    "parent": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "labels": (_opt(_str_list), "a list of strings or null"),
    "training": (lambda v: isinstance(v, dict), "an object"),
    "source": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
    "composition": (_opt(_composition), "null or {method, params, parents: [{name, version, content_hash, "
                    "weight}]}"),
    "name": (_safe_name, "a valid adapter name"),
    "version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "kind": (lambda v: isinstance(v, str) and _FILE_NAME.fullmatch(v) is not None, "a kind name"),
    "rank": (_opt(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null"),
    "alpha": (_opt(lambda v: _number(v) and v > 0), "a finite number > 0 or null"),
    "target_modules": (_str_list, "a list of strings"),
    "modules_to_save": (_str_list, "a list of strings"),
    "num_virtual_tokens": (_opt(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null"),
    "base": (_safe_name, "a valid base name"),
    "base_fingerprint": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "64 hex digits"),
    "files": (_files, "an object mapping plain file names (no paths) to sha256 hex digests"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "schema": (lambda v: v == CARD_SCHEMA, f"{CARD_SCHEMA}"),
}
"""Every stored field's check. A field added to :class:`CardInfo` without an entry here is accepted as
any JSON value (add a check when you add a field)."""


def card_problems(data: dict[str, Any]) -> list[str]:
    """Each card field whose value has the wrong type or range (empty list = well formed)."""
    problems = []
    for key, (check, rule) in _FIELD_CHECKS.items():
        if key in data and not check(data[key]):
            problems.append(f"{key} must be {rule}, not {data[key]!r:.60}")
    return problems
