"""Training data: read JSONL, CSV (either may be gzip-compressed, ``.jsonl.gz``) or saved ``datasets``
directories into rows, rename fields, render
templates, split by group (no movie / MR on both sides), and fingerprint what was used.

A row is a ``dict[str, Any]`` keyed by field name after the recipe's ``fields`` mapping.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from adapterhub_local import assets
from adapterhub_local.errors import FormatError, UnsupportedError
from adapterhub_local.task_spec import render as render
from adapterhub_local.task_spec import template_fields as template_fields

Row = dict[str, Any]


@dataclass
class Splits:
    """Rows for training, periodic validation and the final held-out test."""

    train: list[Row]
    validation: list[Row]
    test: list[Row]
    split_by: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    """split name → where its rows came from (file, or ``split of <file> by <field>``)."""


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "datasets"
    suffix = _plain_suffix(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise FormatError(f"cannot tell the format of {path}", "name it .jsonl/.csv (optionally .gz) or set data.format")


def _plain_suffix(path: Path) -> str:
    """The suffix that says the format, under a ``.gz`` (``x.jsonl.gz`` → ``.jsonl``)."""
    inner = path.with_suffix("") if path.suffix.lower() == ".gz" else path
    return inner.suffix.lower()


def _open_text(path: Path) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def read_rows(ref: str, declared: str = "auto") -> list[Row]:
    """Every row of a JSONL file, CSV file, saved ``datasets`` Dataset, or ``asset:<name>``."""
    path = assets.resolve(ref)
    if not path.exists():
        raise FormatError(f"data file {path} does not exist", "check the path in the recipe")
    kind = detect_format(path, declared)
    if kind == "jsonl":
        rows: list[Row] = []
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}:{number} is not valid JSON ({exc.msg})", "fix that line") from exc
                if not isinstance(item, dict):
                    raise FormatError(f"{path}:{number} is not a JSON object", "write one object per line")
                rows.append(item)
        return rows
    if kind == "csv":
        delimiter = "\t" if _plain_suffix(path) == ".tsv" else ","
        with _open_text(path) as handle:
            return [dict(r) for r in csv.DictReader(handle, delimiter=delimiter)]
    if kind == "datasets":
        return _read_datasets_dir(path)
    raise FormatError(f"unknown data format {kind!r} for {path}", "use jsonl, csv or datasets")


def _read_datasets_dir(path: Path) -> list[Row]:
    try:
        from datasets import Dataset, DatasetDict, load_from_disk
    except ImportError as exc:
        raise UnsupportedError(f"{path} is a `datasets` directory but the datasets package is not installed",
                               "pip install datasets, or export the data as JSONL/CSV") from exc
    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        raise FormatError(f"{path} holds several splits ({', '.join(loaded)})",
                          f"point the recipe at one split, e.g. {path}/train")
    assert isinstance(loaded, Dataset)
    return [dict(r) for r in loaded]


def columns(rows: Sequence[Row]) -> set[str]:
    """Field names present in the rows (the union over the first 100, enough for a header check)."""
    out: set[str] = set()
    for row in rows[:100]:
        out.update(row)
    return out


def rename(rows: Iterable[Row], mapping: dict[str, str]) -> list[Row]:
    """Apply ``{recipe_name: file_column}``: each row gains ``recipe_name`` with that column's value."""
    if not mapping:
        return list(rows)
    out = []
    for row in rows:
        new = dict(row)
        for name, column in mapping.items():
            if column in row:
                new[name] = row[column]
        out.append(new)
    return out


def split_rows(rows: Sequence[Row], by: str | None, validation_fraction: float, test_fraction: float,
               seed: int) -> tuple[list[Row], list[Row], list[Row]]:
    """Deterministic train/validation/test split. With ``by``, whole groups go to one side: groups are
    shuffled with ``seed`` and dealt to test, then validation, until each holds its fraction of rows."""
    keys = [str(r.get(by, "")) if by else str(i) for i, r in enumerate(rows)]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    n = len(rows)
    wanted = [("test", test_fraction * n), ("validation", validation_fraction * n)]
    assigned: dict[str, list[int]] = {"test": [], "validation": [], "train": []}
    slot = 0
    for key in order:
        while slot < len(wanted) and len(assigned[wanted[slot][0]]) >= wanted[slot][1]:
            slot += 1
        name = wanted[slot][0] if slot < len(wanted) else "train"
        assigned[name].extend(groups[key])
    pick = [[rows[i] for i in sorted(assigned[name])] for name in ("train", "validation", "test")]
    return pick[0], pick[1], pick[2]


def load_splits(train: str, validation: str | None, test: str | None, *, fmt: str, mapping: dict[str, str],
                split_by: str | None, validation_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Read the recipe's files; split what is missing off the training file."""
    train_rows = rename(read_rows(train, fmt), mapping)
    val_rows = rename(read_rows(validation, fmt), mapping) if validation else None
    test_rows = rename(read_rows(test, fmt), mapping) if test else None
    sources = {"train": train}
    need_val, need_test = val_rows is None, test_rows is None
    if need_val or need_test:
        tr, va, te = split_rows(train_rows, split_by, validation_fraction if need_val else 0.0,
                                test_fraction if need_test else 0.0, seed)
        train_rows = tr
        how = f"split of {train}" + (f" by {split_by}" if split_by else "")
        if need_val:
            val_rows = va
            sources["validation"] = how
        if need_test:
            test_rows = te
            sources["test"] = how
    if validation:
        sources["validation"] = validation
    if test:
        sources["test"] = test
    assert val_rows is not None and test_rows is not None
    return Splits(train_rows, val_rows, test_rows, split_by, sources)


def fingerprint(splits: Splits, extra: dict[str, Any] | None = None) -> str:
    """sha256 over the rows as used (train, validation, test, in order) plus how they were made."""
    digest = hashlib.sha256()
    digest.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for name in ("train", "validation", "test"):
        digest.update(f"\n#{name}\n".encode())
        for row in getattr(splits, name):
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def group_overlap(a: Sequence[Row], b: Sequence[Row], by: str) -> set[str]:
    """Group keys present on both sides (empty when the split is clean)."""
    return {str(r.get(by)) for r in a} & {str(r.get(by)) for r in b}
