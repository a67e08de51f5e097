"""The registry: bases and immutable adapter versions on disk, with the SQLite index beside them.

Layout under the root::

    bases/<name>/            config, tokenizer, *.safetensors, base.json
    adapters/<name>/<N>/     adapter_model.safetensors, adapter_config.json, card.json (read-only)
    adapters/<name>/tags.json
    .versions/<name>         highest version number ever published (numbers are never reused)
    index.db                 SQLite (WAL), a cache rebuildable from the above
    .staging/                private work directories; never visible as versions

A version is written completely in ``.staging``, fsync'd and sealed, then published by one ``rename``
under an inter-process lock that also allocates its number — so concurrent writers never collide and a
killed writer leaves nothing but a staging directory for ``gc``. Every command that changes the
registry (import, tag, untag, delete, gc, base add/remove) holds the same lock. The rename is the
commit point: an error before it means nothing was published; nothing after it can report failure
(index updates are best effort — the index heals itself from the directories).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from adapterhub_local.errors import (
    AdapterHubError,
    AlreadyExistsError,
    FingerprintMismatchError,
    FormatError,
    IntegrityError,
    InvalidReferenceError,
    NotFoundError,
    UnsupportedError,
)
from adapterhub_local.registry import atomic
from adapterhub_local.registry.bases import BASE_FILE, BaseRecord, describe, materialize, source_kind
from adapterhub_local.registry.cards import CARD_FILE, FULL_WEIGHTS_FILE, PER_EXAMPLE_KEYS, AdapterCard, CardInfo
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_tensors, read_json
from adapterhub_local.registry.index import Index, IndexRow, discard, open_index
from adapterhub_local.registry.layout import Layout
from adapterhub_local.registry.names import parse_reference, validate_name, validate_tag
from adapterhub_local.registry.safefiles import sha256_regular, storage_error

if TYPE_CHECKING:
    import torch

HOME_ENV = "ADAPTERHUB_HOME"
_T = TypeVar("_T")
MODEL_WEIGHTS = FULL_WEIGHTS_FILE


def default_root() -> Path:
    """``$ADAPTERHUB_HOME`` if set, else ``./registry``."""
    return Path(os.environ.get(HOME_ENV) or "registry")


@dataclass
class LoadedAdapter:
    """A verified adapter version in memory."""

    card: AdapterCard
    config: dict[str, object]
    tensors: dict[str, torch.Tensor]
    path: Path


class Registry:
    """Every byte on disk goes through here.

    ``Registry(root)`` (or :meth:`create`) makes the directory if needed; ``Registry(root, create=False)``
    (or :meth:`open`) only opens an existing registry and raises :class:`NotFoundError` naming the path
    otherwise — reading commands use it so that a mistyped path never creates an empty registry.
    """

    def __init__(self, root: Path | str | None = None, *, create: bool = True) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.layout = Layout(self.root)
        if create:
            try:
                self.layout.bases.mkdir(parents=True, exist_ok=True)
                self.layout.adapters.mkdir(exist_ok=True)
            except OSError as exc:
                raise storage_error(exc, self.root, "create the registry at") from exc
        elif not self.root.is_dir() or not any(
                p.exists() for p in (self.layout.bases, self.layout.adapters, self.root / "index.db")):
            what = "does not exist" if not self.root.exists() else "is not a registry"
            raise NotFoundError(f"registry {self.root} {what}",
                                "check --registry / $ADAPTERHUB_HOME (a registry is created by `adapterhub base add`)")
        self._index: Index | None = None

    @classmethod
    def open(cls, root: Path | str | None = None) -> Registry:
        """An existing registry (never creates one)."""
        return cls(root, create=False)

    @classmethod
    def create(cls, root: Path | str | None = None) -> Registry:
        """A registry at ``root``, created if missing."""
        return cls(root, create=True)

    # ------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The inter-process writer lock (every mutation of the registry runs under it)."""
        try:
            lock = atomic.file_lock(self.root / ".lock")
            lock.__enter__()
        except OSError as exc:
            raise storage_error(exc, self.root / ".lock", "lock") from exc
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    def new_staging(self) -> Path:
        """A private work directory under ``.staging`` (collected by ``gc`` if its writer dies)."""
        try:
            return atomic.new_staging_dir(self.root)
        except OSError as exc:
            raise storage_error(exc, self.root / atomic.STAGING_DIR, "create a staging directory in") from exc

    @property
    def index(self) -> Index:
        """The index, opened on first use (rebuilt if corrupt, in memory if the file is not writable)."""
        if self._index is None:
            self._index = open_index(self.root / "index.db", self._populate)
        return self._index

    def _populate(self, index: Index) -> None:
        rows, tags = self.scan()
        index.replace_all(rows, tags)

    def _query(self, query: Callable[[Index], _T]) -> _T:
        """Run a read on the index; if SQLite fails mid-session, fall back to an in-memory rebuild."""
        try:
            return query(self.index)
        except sqlite3.Error:
            self._index = Index(None)
            self._populate(self._index)
            return query(self._index)

    def _after_commit(self, update: Callable[[Index], None]) -> None:
        """Index update after a commit, still under the lock (so it is ordered with other writers): never
        fails the command — the commit stands, and the index heals from the directories."""
        with contextlib.suppress(sqlite3.Error, OSError, AdapterHubError):
            update(self.index)

    def scan(self) -> tuple[list[IndexRow], dict[str, dict[str, int]]]:
        """Index rows and tags read from the directories (versions whose card cannot be read are left out:
        ``verify`` names them)."""
        rows: list[IndexRow] = []
        tags: dict[str, dict[str, int]] = {}
        for name in self.adapter_names():
            for version in self.versions_on_disk(name):
                with contextlib.suppress(NotFoundError, FormatError):
                    rows.append(self.index_row(self.card_of(name, version)))
            with contextlib.suppress(FormatError):
                tags[name] = self.tag_map(name)
        return rows, tags

    def rebuild_index(self) -> int:
        """Recreate the index from the directories; returns versions indexed."""
        with self.locked():
            rows, tags = self.scan()
            try:
                self.index.replace_all(rows, tags)
            except sqlite3.Error:  # the file is damaged beyond the open-time check: start a new one
                with contextlib.suppress(OSError):
                    discard(self.root / "index.db")
                self._index = open_index(self.root / "index.db", self._populate)
        return len(rows)

    # ---------------------------------------------------------------- bases
    def add_base(self, name: str, source: str, revision: str | None = None) -> BaseRecord:
        """Register a base from a local directory, GGUF file or hub id; returns its record."""
        validate_name(name, "base name")
        target = self.layout.bases / name
        if target.exists() or target.is_symlink():
            raise AlreadyExistsError(f"base {name!r} is already registered", "pick another name or `base remove` it")
        kind = source_kind(source)
        staged = self.new_staging()
        try:
            materialize(source, kind, revision, staged)
            record = describe(staged, name, source, kind, revision)
            atomic.write_text_atomic(staged / BASE_FILE, record.to_json())
            atomic.seal_directory(staged)
            with self.locked():
                if target.exists() or target.is_symlink():
                    raise AlreadyExistsError(f"base {name!r} is already registered", "pick another name")
                atomic.publish_directory(staged, target)
        except OSError as exc:
            raise storage_error(exc, target, "write base") from exc
        finally:
            with contextlib.suppress(OSError):
                atomic.remove_tree(staged)
        return replace(record, path=target)

    def base(self, name: str) -> BaseRecord:
        """The record of a registered base."""
        validate_name(name, "base name")
        directory = self.layout.bases / name
        if directory.is_symlink():
            raise FormatError(f"{directory} is a symlink; it is never followed", "remove it and register the base")
        if not (directory / BASE_FILE).exists() and not (directory / BASE_FILE).is_symlink():
            known = ", ".join(b.name for b in self.list_bases()) or "none yet"
            raise NotFoundError(
                f"base {name!r} is not registered (known: {known})", "add it with `adapterhub base add`"
            )
        linked = self.layout.symlinks_in(directory)
        if linked:  # `base add` copies real files: a link was planted, and is never followed
            raise FormatError(f"{linked[0]} is a symlink; registry files are never read through links",
                              f"remove the base directory {directory} and register the base again")
        return BaseRecord.load(directory)

    def list_bases(self) -> list[BaseRecord]:
        return [BaseRecord.load(self.layout.bases / n) for n in self.layout.base_names()
                if (self.layout.bases / n / BASE_FILE).exists()]

    def remove_base(self, name: str) -> None:
        with self.locked():
            record = self.base(name)
            users = [row.ref for row in self.list_adapters() if row.base == name]
            if users:
                raise AlreadyExistsError(f"base {name!r} is used by {len(users)} adapter version(s): {users[:5]}",
                                         "delete those versions first")
            self._trash(record.path)

    # ------------------------------------------------------------- adapters
    def register_adapter(self, name: str, source_dir: Path, base: str, info: CardInfo | None = None) -> AdapterCard:
        """Register a PEFT adapter directory (e.g. from ``PeftModel.save_pretrained``) as a new version,
        after the import gate (:mod:`~adapterhub_local.registry.importer`) admitted it."""
        from adapterhub_local.registry.importer import import_adapter

        return import_adapter(self, name, Path(source_dir), base, info or CardInfo())

    def publish(self, staged: Path, card: AdapterCard) -> AdapterCard:
        """Number, seal and publish a fully staged version (files checked, card filled in but for its
        version). Returns the card as published."""
        try:
            with self.locked():
                card.version = self.layout.next_version(card.name)
                self.layout.raise_highwater(card.name, card.version)  # burnt even if the rest fails
                atomic.write_text_atomic(staged / CARD_FILE, card.to_json())
                atomic.seal_directory(staged)
                atomic.publish_directory(staged, self.layout.version_dir(card.name, card.version))
                self._after_commit(lambda index: index.upsert(self.index_row(card)))
        except OSError as exc:
            raise storage_error(exc, self.layout.version_dir(card.name, card.version), "publish") from exc
        return card

    def index_row(self, card: AdapterCard) -> IndexRow:
        directory = self.layout.version_dir(card.name, card.version)
        try:
            size = sum((directory / f).lstat().st_size for f in card.files)
        except FileNotFoundError as exc:
            raise NotFoundError(f"adapter version {card.ref} vanished", "see `adapterhub list`") from exc
        return IndexRow(
            name=card.name, version=card.version, kind=card.kind, rank=card.rank, alpha=card.alpha,
            task=card.task, base=card.base, base_fingerprint=card.base_fingerprint,
            sha256=card.weights_sha256, created=card.created, size_bytes=size,
            metrics={k: v for k, v in card.metrics.items() if k not in PER_EXAMPLE_KEYS},
        )

    def stored_problems(self) -> list[str]:
        """Damage behind the directories that ``verify`` reports too (a local registry: none)."""
        return []

    def versions_on_disk(self, name: str) -> list[int]:
        return self.layout.versions(name)

    def tag_map(self, name: str) -> dict[str, int]:
        return self.layout.read_tags(name)

    # ------------------------------------------------------------ resolving
    def resolve(self, ref: str) -> AdapterCard:
        """Turn ``name``, ``name@N``, ``name:tag`` or ``sha256:<prefix>`` into a version's card."""
        return self.card_of(*self.locate(ref))

    def locate(self, ref: str) -> tuple[str, int]:
        """The (name, version) a reference points at, without reading the version's card (so a version
        whose card is damaged can still be named, e.g. to delete it)."""
        parsed = parse_reference(ref)
        if parsed.sha_prefix is not None:
            card = self._resolve_sha(parsed.sha_prefix)
            return card.name, card.version
        assert parsed.name is not None
        name = parsed.name
        versions = self.versions_on_disk(name)
        if not versions:
            raise NotFoundError(f"adapter {name!r} is not registered", "see `adapterhub list`")
        if parsed.tag is not None:
            tags = self.tag_map(name)
            if parsed.tag not in tags:
                raise NotFoundError(f"adapter {name!r} has no tag {parsed.tag!r} (tags: {sorted(tags) or 'none'})",
                                    f"tag a version with `adapterhub tag {name}@N {parsed.tag}`")
            version = tags[parsed.tag]
            if version not in versions:
                raise NotFoundError(f"tag {name}:{parsed.tag} points at version {version}, which no longer exists",
                                    f"move it with `adapterhub tag {name}@N {parsed.tag}`")
        elif parsed.version is not None:
            if parsed.version not in versions:
                raise NotFoundError(f"adapter {name!r} has no version {parsed.version} (versions: {versions})",
                                    "pick one of those")
            version = parsed.version
        else:
            version = versions[-1]
        return name, version

    def _resolve_sha(self, prefix: str) -> AdapterCard:
        self.list_adapters()  # heal the index first: a version published by a killed writer counts too
        matches = sorted({(m.name, m.version) for m in self._query(lambda index: index.by_sha_prefix(prefix))})
        cards = []
        for name, version in matches:  # the index is a cache: trust only what the card says
            with contextlib.suppress(NotFoundError, FormatError):
                card = self.card_of(name, version)
                if card.weights_sha256.startswith(prefix):
                    cards.append(card)
        if not cards:  # the index may be stale or tampered with: ask the cards themselves, then heal it
            rows, tags = self.scan()
            cards = [self.card_of(r.name, r.version) for r in rows if r.sha256.startswith(prefix)]
            if cards:
                self._after_commit(lambda index: index.replace_all(rows, tags))
        if not cards:
            raise NotFoundError(f"no adapter version has sha256 starting {prefix}", "see `adapterhub list` for hashes")
        if len(cards) > 1:
            raise InvalidReferenceError(f"sha256:{prefix} is ambiguous: {', '.join(c.ref for c in cards)}",
                                        "give more hex digits")
        return cards[0]

    def card_of(self, name: str, version: int) -> AdapterCard:
        directory = self.layout.version_dir(name, version)
        if not self.layout.is_real_dir(directory):
            raise NotFoundError(f"adapter version {name}@{version} does not exist", "see `adapterhub list`")
        try:
            return AdapterCard.load(directory / CARD_FILE, name, version)
        except FormatError:
            if not self.layout.is_real_dir(directory):  # deleted while we read it
                raise NotFoundError(f"adapter version {name}@{version} does not exist",
                                    "see `adapterhub list`") from None
            raise

    def path_of(self, card: AdapterCard) -> Path:
        return self.layout.version_dir(card.name, card.version)

    def check_files(self, card: AdapterCard) -> list[str]:
        """Problems with a version's bytes (empty list = intact): every file the card lists is present,
        a regular file, and matches its sha256; nothing else is in the directory."""
        directory = self.path_of(card)
        problems = []
        try:
            present = {p.name for p in directory.iterdir()} - {CARD_FILE}
        except FileNotFoundError:
            return [f"{card.ref}: the version directory vanished"]
        for missing in sorted(set(card.files) - present):
            problems.append(f"{card.ref}: file {missing} is missing")
        for extra in sorted(present - set(card.files)):
            problems.append(f"{card.ref}: unexpected file {extra}")
        for fname, digest in sorted(card.files.items()):
            if fname not in present:
                continue
            try:
                actual = sha256_regular(directory / fname, directory)
            except FormatError as exc:
                problems.append(f"{card.ref}: {exc.problem}")
                continue
            if actual != digest:
                problems.append(f"{card.ref}: {fname} does not match its sha256 (damaged)")
        return problems

    def verified_path(self, ref: str, base: str | None = None) -> tuple[AdapterCard, Path]:
        """Resolve, check integrity and (optionally) the base; return the card and version directory."""
        card = self.resolve(ref)
        problems = self.check_files(card)
        if problems:
            raise IntegrityError("; ".join(problems), "restore the version from an export or delete it")
        if base is not None:
            self.check_base(card, base)
        return card, self.path_of(card)

    def check_base(self, card: AdapterCard, base: str) -> None:
        record = self.base(base)
        if card.base_fingerprint != record.fingerprint:
            raise FingerprintMismatchError(
                f"adapter {card.ref} was made on base {card.base!r} (fingerprint {card.base_fingerprint[:12]}), "
                f"not on base {record.name!r} (fingerprint {record.short})",
                f"load it onto base {card.base!r}",
            )

    def load_adapter(self, ref: str, base: str | None = None) -> LoadedAdapter:
        """Load a verified version's tensors and PEFT config."""
        card, path = self.verified_path(ref, base)
        if card.kind == "full":
            raise UnsupportedError(f"{card.ref} is a full fine-tune (a whole model), not an adapter of {card.base!r}",
                                   f"use `adapterhub eval {card.ref} --data FILE` or "
                                   f"`adapterhub predict {card.ref} TEXT`")
        return LoadedAdapter(card=card, config=read_json(path / ADAPTER_CONFIG, "adapter config"),
                             tensors=load_tensors(path / ADAPTER_WEIGHTS), path=path)

    # -------------------------------------------------------------- listing
    def list_adapters(self, name: str | None = None) -> list[IndexRow]:
        """Index rows, reconciled with the directories first (a crash between publish and index
        update is healed here; versions deleted meanwhile are dropped)."""
        if name is not None:
            validate_name(name, "adapter name")
        on_disk = {(n, v) for n in self.adapter_names() if name in (None, n) for v in self.versions_on_disk(n)}
        rows = self._query(lambda index: index.rows(name))
        indexed = {(r.name, r.version) for r in rows}
        if on_disk == indexed:
            return rows
        fresh: list[IndexRow] = []
        for n, v in sorted(on_disk - indexed):
            with contextlib.suppress(NotFoundError, FormatError):
                fresh.append(self.index_row(self.card_of(n, v)))
        gone = sorted(indexed - on_disk)
        with contextlib.suppress(sqlite3.Error):
            for row in fresh:
                self.index.upsert(row)
            for n, v in gone:
                self.index.remove(n, v)
        keep = [r for r in rows if (r.name, r.version) not in set(gone)]
        return sorted(keep + fresh, key=lambda r: (r.name, r.version))

    def adapter_names(self) -> list[str]:
        return self.layout.adapter_names()

    def tags(self, name: str | None = None) -> list[tuple[str, str, int]]:
        names = [validate_name(name, "adapter name")] if name else self.adapter_names()
        return [(n, t, v) for n in names for t, v in sorted(self.tag_map(n).items())]

    # ------------------------------------------------------------- mutation
    def tag(self, ref: str, tag: str) -> AdapterCard:
        """Point ``name:tag`` at the version ``ref`` resolves to (moving the tag if it exists)."""
        validate_tag(tag)
        with self.locked():
            card = self.resolve(ref)
            tags = self.tag_map(card.name)
            tags[tag] = card.version
            self._write_tags(card.name, tags)
            self._after_commit(lambda index: index.set_tags(card.name, tags))
        return card

    def untag(self, name: str, tag: str) -> None:
        validate_name(name, "adapter name")
        validate_tag(tag)
        with self.locked():
            tags = self.tag_map(name)
            if tag not in tags:
                raise NotFoundError(f"adapter {name!r} has no tag {tag!r}", "see `adapterhub list --tags`")
            del tags[tag]
            self._write_tags(name, tags)
            self._after_commit(lambda index: index.set_tags(name, tags))

    def prune_tags(self, name: str, versions: list[int]) -> list[str]:
        """Drop tags of ``name`` pointing at versions not in ``versions`` (call under the lock); returns them."""
        tags = self.tag_map(name)
        dangling = sorted(t for t, v in tags.items() if v not in versions)
        if dangling:
            kept = {t: v for t, v in tags.items() if t not in dangling}
            self._write_tags(name, kept)
            self._after_commit(lambda index: index.set_tags(name, kept))
        return dangling

    def _write_tags(self, name: str, tags: dict[str, int]) -> None:
        try:
            self.layout.write_tags(name, tags)
        except OSError as exc:
            raise storage_error(exc, self.layout.tags_path(name), "write") from exc

    def delete(self, ref: str) -> str:
        """Remove one version (and tags pointing at it); returns its ``name@N``. Works on a version whose
        card is damaged. The directory vanishes in one rename — the commit point; clean-up after it is
        best effort and never reports failure."""
        with self.locked():
            name, version = self.locate(ref)
            try:
                self.layout.raise_highwater(name, version)  # its number stays used
            except OSError as exc:
                raise storage_error(exc, self.layout.highwater_path(name), "write") from exc
            self._trash(self.layout.version_dir(name, version))
            with contextlib.suppress(OSError, FormatError):
                if self.versions_on_disk(name):
                    tags = {t: v for t, v in self.tag_map(name).items() if v != version}
                    self.layout.write_tags(name, tags)
                else:
                    atomic.remove_tree(self.layout.adapters / name)
            self._after_commit(lambda index: index.remove(name, version))
        return f"{name}@{version}"

    def _trash(self, directory: Path) -> None:
        """Move ``directory`` out of sight in one rename (the commit), then remove it (best effort)."""
        trash = self.new_staging()
        try:
            os.rename(directory, trash / "gone")
        except OSError as exc:
            with contextlib.suppress(OSError):
                trash.rmdir()
            raise storage_error(exc, directory, "remove") from exc
        with contextlib.suppress(OSError):
            atomic.remove_tree(trash)
