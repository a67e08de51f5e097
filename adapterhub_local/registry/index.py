"""The SQLite index (WAL mode): a fast, queryable view of what the directories hold.

It is never the source of truth — ``rebuild`` recreates it from the version directories, tag files and
base records — so a lost or damaged ``index.db`` costs nothing but a rebuild. :func:`open_index` does
that by itself: a corrupt file is discarded and rebuilt, and where the file cannot be written (a
read-only registry) an in-memory index is built from the directories instead.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rank INTEGER,
    alpha REAL,
    task TEXT,
    base TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS adapters_sha ON adapters(sha256);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, tag)
);
"""


@dataclass(frozen=True)
class IndexRow:
    """One adapter version as the index knows it."""

    name: str
    version: int
    kind: str
    rank: int | None
    alpha: float | None
    task: str | None
    base: str
    base_fingerprint: str
    sha256: str
    created: str
    size_bytes: int
    metrics: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_COLUMNS = ["name", "version", "kind", "rank", "alpha", "task", "base", "base_fingerprint", "sha256", "created",
            "size_bytes", "metrics"]


class Index:
    """Thin wrapper over the SQLite file (or, with ``path=None``, an in-memory database); every method
    opens a short transaction. Opening checks the file's integrity and schema (``sqlite3.DatabaseError``
    if either is wrong)."""

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._memory = sqlite3.connect(":memory:", check_same_thread=False) if path is None else None
        with self._connect() as conn:
            try:
                conn.executescript(_SCHEMA)
            except sqlite3.OperationalError as exc:
                if "column" in str(exc):  # a table of another shape: damage, not a read-only file
                    raise sqlite3.DatabaseError(f"{self.path} has an unexpected schema ({exc})") from exc
                raise
            if self._memory is None:
                if conn.execute("PRAGMA quick_check").fetchone() != ("ok",):
                    raise sqlite3.DatabaseError(f"{self.path} failed its integrity check")
                columns = [row[1] for row in conn.execute("PRAGMA table_info(adapters)")]
                if columns != _COLUMNS:
                    raise sqlite3.DatabaseError(f"{self.path} has an unexpected schema {columns}")

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self._memory is not None:
            with self._memory:
                yield self._memory
            return
        assert self.path is not None
        conn = sqlite3.connect(self.path, timeout=60.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=60000")
            with conn:
                yield conn
        finally:
            conn.close()

    def upsert(self, row: IndexRow) -> None:
        with self._connect() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (row.name, row.version, row.kind, row.rank, row.alpha, row.task, row.base,
                 row.base_fingerprint, row.sha256, row.created, row.size_bytes, json.dumps(row.metrics)),
            )

    def remove(self, name: str, version: int) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM adapters WHERE name=? AND version=?", (name, version))
            conn.execute("DELETE FROM tags WHERE name=? AND version=?", (name, version))

    def set_tags(self, name: str, tags: dict[str, int]) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM tags WHERE name=?", (name,))
            conn.executemany("INSERT INTO tags VALUES (?,?,?)", [(name, t, v) for t, v in tags.items()])

    def rows(self, name: str | None = None) -> list[IndexRow]:
        query = "SELECT * FROM adapters" + (" WHERE name=?" if name else "") + " ORDER BY name, version"
        with self._connect() as conn:
            cursor = conn.execute(query, (name,) if name else ())
            return [_row(values) for values in cursor.fetchall()]

    def by_sha_prefix(self, prefix: str) -> list[IndexRow]:
        with self._connect() as conn:
            cursor = conn.execute("SELECT * FROM adapters WHERE sha256 LIKE ?", (prefix + "%",))
            return [_row(values) for values in cursor.fetchall()]

    def tags(self, name: str | None = None) -> list[tuple[str, str, int]]:
        query = "SELECT name, tag, version FROM tags" + (" WHERE name=?" if name else "") + " ORDER BY name, tag"
        with self._connect() as conn:
            return [(str(n), str(t), int(v)) for n, t, v in conn.execute(query, (name,) if name else ())]

    def replace_all(self, rows: list[IndexRow], tags: dict[str, dict[str, int]]) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM adapters")
            conn.execute("DELETE FROM tags")
            for row in rows:
                conn.execute(
                    "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (row.name, row.version, row.kind, row.rank, row.alpha, row.task, row.base,
                     row.base_fingerprint, row.sha256, row.created, row.size_bytes,
                     json.dumps(row.metrics)),
                )
            for name, mapping in tags.items():
                conn.executemany("INSERT INTO tags VALUES (?,?,?)", [(name, t, v) for t, v in mapping.items()])


def _row(values: tuple[Any, ...]) -> IndexRow:
    (name, version, kind, rank, alpha, task, base, fp, sha, created, size, metrics) = values
    return IndexRow(
        name=name, version=int(version), kind=kind, rank=rank, alpha=alpha, task=task, base=base,
        base_fingerprint=fp, sha256=sha, created=created, size_bytes=int(size), metrics=json.loads(metrics),
    )


def open_index(path: Path, populate: Callable[[Index], None]) -> Index:
    """The index at ``path``; if it is corrupt it is discarded and rebuilt with ``populate``; if it
    cannot be opened for writing (read-only registry) an in-memory index is populated instead."""
    path = Path(path)
    try:
        return Index(path)
    except sqlite3.OperationalError:
        index = Index(None)  # cannot open or write the file: leave it alone
    except sqlite3.DatabaseError:
        try:
            discard(path)
            index = Index(path)
        except (OSError, sqlite3.Error):
            index = Index(None)
    populate(index)
    return index


def discard(path: Path) -> None:
    """Remove an index file and its WAL companions."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()
