"""Both registry back ends behind one test interface, for the contract tests that run on each: a local
directory and an S3-compatible object store (moto's server, see ``s3_kit``). A :class:`Backend` opens more
clients of its registry and changes what is stored as an attacker with write access to the storage would:
the directory's files, or the bucket's objects through s3fs — never a client's local read cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapterhub_local.registry import Registry
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.objectstore import ObjectStoreRegistry
from tests.registry import s3_kit


def local_only(reason: str) -> pytest.MarkDecorator:
    """Run a test taking the ``backend`` fixture on the local back end only; ``reason`` (one line: why the
    contract has no object-store meaning) is shown as the skip reason of its s3 variant."""
    return pytest.mark.parametrize(
        "backend", ["local", pytest.param("s3", marks=pytest.mark.skip(reason=reason))], indirect=True)


def _writable(path: Path) -> Path:
    os.chmod(path.parent, 0o755)
    if path.exists():
        os.chmod(path, 0o644)
    return path


@dataclass
class Backend:
    """One registry on one back end: ``registry`` is its first client."""

    kind: str
    registry: Registry
    location: str
    tmp: Path
    fs: Any = None

    @property
    def is_s3(self) -> bool:
        return self.kind == "s3"

    def fresh(self, cache: str = "reader") -> Registry:
        """Another client: for S3 one with its own empty cache (another machine); locally the directory."""
        if self.is_s3:
            return ObjectStoreRegistry(self.location, cache=self.tmp / cache, create=False)
        return Registry.open(self.location)

    def reopen(self) -> Registry:
        """The first client started again (S3: on the same cache)."""
        if isinstance(self.registry, ObjectStoreRegistry):
            return ObjectStoreRegistry(self.location, cache=self.registry.cache, create=False)
        return Registry.open(self.location)

    # ------------------------------------------------ where things are stored (regexes for error texts)
    def tags_file(self, name: str) -> str:
        return rf"tags/{name}/\d+\.json" if self.is_s3 else rf"adapters/{name}/tags\.json"

    def card_file(self, name: str, version: int) -> str:
        return rf"adapters/{name}/{version}\.json" if self.is_s3 else rf"adapters/{name}/{version}/card\.json"

    def base_file(self, name: str) -> str:
        return rf"bases/{name}\.json" if self.is_s3 else rf"bases/{name}/base\.json"

    def counter_file(self, name: str) -> str:
        return rf"adapters/{name}/\S*" if self.is_s3 else rf"\.versions/{name}"

    # ------------------------------------------------------------------ tampering with what is stored
    def _key(self, *parts: str) -> str:
        return "/".join((self.location.split("://", 1)[1], *parts))

    def write_tags(self, name: str, text: str) -> None:
        """Replace the name's tag map by ``text`` (on S3: the latest map object, as ``{"tags": text}``)."""
        if not self.is_s3:
            _writable(self.registry.root / "adapters" / name / "tags.json").write_text(text)
            return
        latest = max(int(str(k).rsplit("/", 1)[1][:-5]) for k in self.fs.ls(self._key("tags", name), detail=False))
        self.fs.pipe_file(self._key("tags", name, f"{latest}.json"), ('{"tags": ' + text + "}").encode())

    def card_data(self, name: str, version: int) -> dict[str, Any]:
        if self.is_s3:
            data: dict[str, Any] = json.loads(self.fs.cat_file(self._key("adapters", name, f"{version}.json")))
            return data
        return dict(json.loads((self.registry.root / "adapters" / name / str(version) / "card.json").read_text()))

    def write_card(self, name: str, version: int, text: str) -> None:
        """Replace a version's card (on S3: its manifest, which is the card)."""
        if self.is_s3:
            self.fs.pipe_file(self._key("adapters", name, f"{version}.json"), text.encode())
        else:
            _writable(self.registry.root / "adapters" / name / str(version) / "card.json").write_text(text)

    def replace_file(self, card: AdapterCard, fname: str, content: bytes) -> None:
        """Replace a stored file's bytes, leaving its recorded sha256 (on S3: the object the card names)."""
        if self.is_s3:
            self.fs.pipe_file(self._key("objects", card.files[fname]), content)
        else:
            _writable(self.registry.path_of(card) / fname).write_bytes(content)

    def _base_manifest(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.fs.cat_file(self._key("bases", f"{name}.json")))
        return data

    def base_record(self, name: str) -> dict[str, Any]:
        if self.is_s3:
            digest = self._base_manifest(name)["files"]["base.json"]
            return dict(json.loads(self.fs.cat_file(self._key("objects", digest))))
        return dict(json.loads((self.registry.root / "bases" / name / "base.json").read_text()))

    def write_base_record(self, name: str, text: str) -> None:
        """Replace a base's record; on S3 as a careful attacker would: the new bytes uploaded as an object
        and the base's manifest pointed at them (so the sha256 matches and only the record is wrong)."""
        if not self.is_s3:
            _writable(self.registry.root / "bases" / name / "base.json").write_text(text)
            return
        digest = hashlib.sha256(text.encode()).hexdigest()
        self.fs.pipe_file(self._key("objects", digest), text.encode())
        manifest = self._base_manifest(name)
        manifest["files"]["base.json"] = digest
        self.fs.pipe_file(self._key("bases", f"{name}.json"), json.dumps(manifest).encode())

    def damage_counter(self, name: str, text: str, key: str) -> None:
        """Break the record of used version numbers: locally the high-water mark holds ``text``; on S3 a key
        ``key`` that is no manifest or marker appears among the name's manifests."""
        if self.is_s3:
            self.fs.pipe_file(self._key("adapters", name, key), b"")
        else:
            _writable(self.registry.root / ".versions" / name).write_text(text)

    def raise_counter(self, name: str, version: int) -> None:
        """Record ``version`` as used by hand (locally the high-water mark; on S3 a deletion marker)."""
        if self.is_s3:
            self.fs.pipe_file(self._key("adapters", name, f"{version}.deleted"), b"")
        else:
            _writable(self.registry.root / ".versions" / name).write_text(f"{version}\n")


def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A new, empty registry on the back end ``request.param`` names (S3: its own bucket on the module's
    server, first client's cache under tmp_path)."""
    if request.param == "local":
        root = tmp_path / "registry"
        return Backend("local", Registry(root), str(root), tmp_path)
    endpoint = request.getfixturevalue("s3_env")["AWS_ENDPOINT_URL"]
    url = f"s3://{s3_kit.new_bucket(endpoint)}/team/registry"
    return Backend("s3", ObjectStoreRegistry(url, cache=tmp_path / "cache-a"), url, tmp_path,
                   s3_kit.filesystem(endpoint))
