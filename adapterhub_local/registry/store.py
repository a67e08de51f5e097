"""The registry: bases and immutable adapter versions on disk, with the SQLite index beside them.

Layout under the root::

    bases/<name>/            config, tokenizer, *.safetensors, base.json
    adapters/<name>/<N>/     adapter_model.safetensors, adapter_config.json, card.json (read-only)
    adapters/<name>/tags.json
    index.db                 SQLite (WAL), rebuildable from the above
    .staging/                private work directories; never visible as versions

A version is written completely in ``.staging``, fsync'd and sealed, then published by one ``rename``
under an inter-process lock that also allocates its number — so concurrent writers never collide and a
killed writer leaves nothing but a staging directory for ``gc``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from adapterhub_local.errors import (
    AlreadyExistsError,
    FingerprintMismatchError,
    IntegrityError,
    InvalidReferenceError,
    NotFoundError,
    UnsupportedError,
)
from adapterhub_local.registry import atomic
from adapterhub_local.registry.bases import BaseRecord, describe, materialize, source_kind
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard, CardInfo
from adapterhub_local.registry.fingerprint import tensor_shapes
from adapterhub_local.registry.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_tensors,
    read_json,
)
from adapterhub_local.registry.index import Index, IndexRow
from adapterhub_local.registry.names import parse_reference, validate_name, validate_tag
from adapterhub_local.registry.peft_dir import AdapterSummary, check_against_base, summarize_adapter_dir

HOME_ENV = "ADAPTERHUB_HOME"
MODEL_WEIGHTS = "model.safetensors"
"""The weights file of a full fine-tune version (``registry/model_kinds.py``)."""
_TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "sequence_classification", "FEATURE_EXTRACTION": "feature",
               "TOKEN_CLS": "token_classification", "SEQ_2_SEQ_LM": "seq2seq_lm"}


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
    """Every byte on disk goes through here."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "bases").mkdir(exist_ok=True)
        (self.root / "adapters").mkdir(exist_ok=True)
        self.index = Index(self.root / "index.db")

    def _lock(self):  # type: ignore[no-untyped-def]
        return atomic.file_lock(self.root / ".lock")

    # ---------------------------------------------------------------- bases
    def add_base(self, name: str, source: str, revision: str | None = None) -> BaseRecord:
        """Register a base from a local directory, GGUF file or hub id; returns its record."""
        validate_name(name, "base name")
        target = self.root / "bases" / name
        if target.exists():
            raise AlreadyExistsError(f"base {name!r} is already registered", "pick another name or `base remove` it")
        kind = source_kind(source)
        staged = atomic.new_staging_dir(self.root)
        try:
            materialize(source, kind, revision, staged)
            record = describe(staged, name, source, kind, revision)
            atomic.write_text_atomic(staged / "base.json", record.to_json())
            atomic.seal_directory(staged)
            with self._lock():
                if target.exists():
                    raise AlreadyExistsError(f"base {name!r} is already registered", "pick another name")
                atomic.publish_directory(staged, target)
        finally:
            atomic.remove_tree(staged)
        return replace(record, path=target)

    def base(self, name: str) -> BaseRecord:
        """The record of a registered base."""
        validate_name(name, "base name")
        directory = self.root / "bases" / name
        if not (directory / "base.json").exists():
            known = ", ".join(b.name for b in self.list_bases()) or "none yet"
            raise NotFoundError(
                f"base {name!r} is not registered (known: {known})", "add it with `adapterhub base add`"
            )
        return BaseRecord.load(directory)

    def list_bases(self) -> list[BaseRecord]:
        root = self.root / "bases"
        return [BaseRecord.load(d) for d in sorted(root.iterdir()) if (d / "base.json").exists()]

    def remove_base(self, name: str) -> None:
        record = self.base(name)
        users = [row.ref for row in self.list_adapters() if row.base == name]
        if users:
            raise AlreadyExistsError(f"base {name!r} is used by {len(users)} adapter version(s): {users[:5]}",
                                     "delete those versions first")
        self._trash(record.path)

    # ------------------------------------------------------------- adapters
    def register_adapter(self, name: str, source_dir: Path, base: str, info: CardInfo | None = None) -> AdapterCard:
        """Register a PEFT adapter directory (e.g. from ``PeftModel.save_pretrained``) as a new version.

        Checks every tensor against the base's shapes and, where the directory carries one of our cards,
        the base fingerprint it was made on.
        """
        validate_name(name, "adapter name")
        info = info or CardInfo()
        record = self.base(base)
        summary = summarize_adapter_dir(Path(source_dir))
        check_against_base(summary, tensor_shapes(record.path), record.hidden_size, record.name)
        foreign = Path(source_dir) / CARD_FILE
        if foreign.exists():
            theirs = AdapterCard.load(foreign)
            if theirs.base_fingerprint and theirs.base_fingerprint != record.fingerprint:
                raise FingerprintMismatchError(
                    f"adapter was made on base {theirs.base!r} (fingerprint {theirs.base_fingerprint[:12]}), "
                    f"not on base {record.name!r} (fingerprint {record.short})",
                    "register it against the base it was trained on",
                )
        staged = atomic.new_staging_dir(self.root)
        try:
            shutil.copyfile(Path(source_dir) / ADAPTER_WEIGHTS, staged / ADAPTER_WEIGHTS)
            shutil.copyfile(Path(source_dir) / ADAPTER_CONFIG, staged / ADAPTER_CONFIG)
            files = {f: atomic.sha256_file(staged / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
            card = self._make_card(name, summary, record, info, files)
            with self._lock():
                versions = self.versions_on_disk(name)
                card.version = (max(versions) if versions else 0) + 1
                atomic.write_text_atomic(staged / CARD_FILE, card.to_json())
                atomic.seal_directory(staged)
                atomic.publish_directory(staged, self._version_dir(name, card.version))
                self.index.upsert(self.index_row(card))
        finally:
            atomic.remove_tree(staged)
        return card

    def publish_version(self, name: str, staged: Path, card: AdapterCard) -> AdapterCard:
        """Publish ``staged`` (a private directory from ``atomic.new_staging_dir`` holding every file the card
        lists) as the next version of ``name``: number allocated, card written, sealed, renamed, indexed —
        under the lock, so concurrent publishers never collide. For kinds registered outside this class
        (``registry/model_kinds.py``)."""
        validate_name(name, "adapter name")
        with self._lock():
            versions = self.versions_on_disk(name)
            card.version = (max(versions) if versions else 0) + 1
            atomic.write_text_atomic(staged / CARD_FILE, card.to_json())
            atomic.seal_directory(staged)
            atomic.publish_directory(staged, self._version_dir(name, card.version))
            self.index.upsert(self.index_row(card))
        return card

    def _make_card(
        self, name: str, summary: AdapterSummary, record: BaseRecord, info: CardInfo, files: dict[str, str]
    ) -> AdapterCard:
        task_type = info.task_type or _TASK_TYPES.get(str(summary.task_type))
        return AdapterCard(
            **{**info.__dict__, "task_type": task_type},
            name=name, kind=summary.kind, rank=summary.rank, alpha=summary.alpha,
            target_modules=summary.target_modules,
            modules_to_save=sorted({str(m) for m in summary.config.get("modules_to_save") or []}),
            num_virtual_tokens=summary.num_virtual_tokens, base=record.name, base_fingerprint=record.fingerprint,
            files=files, created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        )

    def index_row(self, card: AdapterCard) -> IndexRow:
        size = sum((self._version_dir(card.name, card.version) / f).stat().st_size for f in card.files)
        return IndexRow(
            name=card.name, version=card.version, kind=card.kind, rank=card.rank, alpha=card.alpha,
            task=card.task, base=card.base, base_fingerprint=card.base_fingerprint,
            sha256=card.files.get(ADAPTER_WEIGHTS) or card.files.get(MODEL_WEIGHTS, ""), created=card.created,
            size_bytes=size,
            metrics=card.metrics,
        )

    def _version_dir(self, name: str, version: int) -> Path:
        return self.root / "adapters" / name / str(version)

    def versions_on_disk(self, name: str) -> list[int]:
        directory = self.root / "adapters" / name
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())

    def tag_map(self, name: str) -> dict[str, int]:
        path = self.root / "adapters" / name / "tags.json"
        if not path.exists():
            return {}
        return {str(k): int(v) for k, v in read_json(path, "tag file").items()}

    # ------------------------------------------------------------ resolving
    def resolve(self, ref: str) -> AdapterCard:
        """Turn ``name``, ``name@N``, ``name:tag`` or ``sha256:<prefix>`` into a version's card."""
        parsed = parse_reference(ref)
        if parsed.sha_prefix is not None:
            matches = self.index.by_sha_prefix(parsed.sha_prefix)
            if not matches:
                raise NotFoundError(f"no adapter version has sha256 starting {parsed.sha_prefix}",
                                    "see `adapterhub list` for hashes")
            if len({(m.name, m.version) for m in matches}) > 1:
                raise InvalidReferenceError(f"sha256:{parsed.sha_prefix} is ambiguous: "
                                            f"{', '.join(m.ref for m in matches)}", "give more hex digits")
            name, version = matches[0].name, matches[0].version
        else:
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
            elif parsed.version is not None:
                if parsed.version not in versions:
                    raise NotFoundError(f"adapter {name!r} has no version {parsed.version} (versions: {versions})",
                                        "pick one of those")
                version = parsed.version
            else:
                version = versions[-1]
        return self.card_of(name, version)

    def card_of(self, name: str, version: int) -> AdapterCard:
        directory = self._version_dir(name, version)
        if not directory.is_dir():
            raise NotFoundError(f"adapter version {name}@{version} does not exist", "see `adapterhub list`")
        return AdapterCard.load(directory / CARD_FILE)

    def path_of(self, card: AdapterCard) -> Path:
        return self._version_dir(card.name, card.version)

    def check_files(self, card: AdapterCard) -> list[str]:
        """Problems with a version's bytes (empty list = intact)."""
        directory = self.path_of(card)
        problems = []
        present = {p.name for p in directory.iterdir()} - {CARD_FILE}
        for missing in sorted(set(card.files) - present):
            problems.append(f"{card.ref}: file {missing} is missing")
        for extra in sorted(present - set(card.files)):
            problems.append(f"{card.ref}: unexpected file {extra}")
        for fname, digest in sorted(card.files.items()):
            if fname in present and atomic.sha256_file(directory / fname) != digest:
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
        update is healed here)."""
        if name is not None:
            validate_name(name, "adapter name")
        on_disk = {(n, v) for n in self.adapter_names() if name in (None, n) for v in self.versions_on_disk(n)}
        rows = self.index.rows(name)
        indexed = {(r.name, r.version) for r in rows}
        if on_disk != indexed:
            for n, v in sorted(on_disk - indexed):
                self.index.upsert(self.index_row(self.card_of(n, v)))
            for n, v in sorted(indexed - on_disk):
                self.index.remove(n, v)
            rows = self.index.rows(name)
        return rows

    def adapter_names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "adapters").iterdir() if p.is_dir())

    def tags(self, name: str | None = None) -> list[tuple[str, str, int]]:
        names = [name] if name else self.adapter_names()
        return [(n, t, v) for n in names for t, v in sorted(self.tag_map(n).items())]

    # ------------------------------------------------------------- mutation
    def tag(self, ref: str, tag: str) -> AdapterCard:
        """Point ``name:tag`` at the version ``ref`` resolves to (moving the tag if it exists)."""
        validate_tag(tag)
        card = self.resolve(ref)
        with self._lock():
            tags = self.tag_map(card.name)
            tags[tag] = card.version
            atomic.write_text_atomic(self.root / "adapters" / card.name / "tags.json", json.dumps(tags, indent=2))
            self.index.set_tags(card.name, tags)
        return card

    def untag(self, name: str, tag: str) -> None:
        validate_name(name, "adapter name")
        validate_tag(tag)
        with self._lock():
            tags = self.tag_map(name)
            if tag not in tags:
                raise NotFoundError(f"adapter {name!r} has no tag {tag!r}", "see `adapterhub list --tags`")
            del tags[tag]
            atomic.write_text_atomic(self.root / "adapters" / name / "tags.json", json.dumps(tags, indent=2))
            self.index.set_tags(name, tags)

    def delete(self, ref: str) -> AdapterCard:
        """Remove one version (and tags pointing at it). The directory vanishes in one rename."""
        card = self.resolve(ref)
        with self._lock():
            tags = {t: v for t, v in self.tag_map(card.name).items() if v != card.version}
            atomic.write_text_atomic(self.root / "adapters" / card.name / "tags.json", json.dumps(tags, indent=2))
            self._trash(self.path_of(card))
            self.index.remove(card.name, card.version)
            self.index.set_tags(card.name, tags)
            name_dir = self.root / "adapters" / card.name
            if not self.versions_on_disk(card.name):
                atomic.remove_tree(name_dir)
        return card

    def _trash(self, directory: Path) -> None:
        trash = atomic.new_staging_dir(self.root)
        os.rename(directory, trash / "gone")
        atomic.remove_tree(trash)
