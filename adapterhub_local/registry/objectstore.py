"""A registry on object storage (``--registry s3://bucket/prefix``, through fsspec/s3fs), with the local
registry's contract: immutable versions, atomic publish, version numbers never reused, every byte
checked against its sha256 on read, an index rebuildable from what is stored.

Layout under the prefix::

    registry.json                    marker: this prefix is an adapterhub registry
    objects/<sha256>                 every file's bytes, content-addressed (written once, never changed)
    bases/<name>.json                a base's manifest: its base.json record and {file: sha256}
    adapters/<name>/<N>.json         a version's card (card.json, which lists {file: sha256})
    adapters/<name>/<N>.deleted      a deletion marker (the number stays used)
    tags/<name>/<seq>.json           the name's tag map, one object per change

**Publish** uploads the version's files to ``objects/`` (invisible: nothing refers to them yet), then
creates ``adapters/<name>/<N>.json`` with a *conditional write* (``If-None-Match: *``, s3fs
``mode="create"``): the store accepts the first writer of a key and refuses every later one with 412. That
create is the commit point and also allocates the number: a writer refused for N lists again and tries
the next number, so two writers never share a number, and since manifests are never deleted a number is
never reused. A writer killed before the create leaves only unreferenced objects (content-addressed, so
harmless and shared with any later upload of the same bytes); a manifest is written in one PUT, so it is
whole or absent. (S3 has supported ``If-None-Match`` on PutObject since August 2024; moto's server
implements it. A lock object with expiry was not needed — and would be unsafe with a paused writer
outliving its lease.)

**Reading** goes through a local cache (``$ADAPTERHUB_CACHE`` or ``~/.cache/adapterhub``): an ordinary
:class:`~adapterhub_local.registry.store.Registry` holding the versions already fetched, and a blob cache
keyed by content hash. :meth:`ObjectStoreRegistry.sync` fetches each manifest not yet cached, checks
every object it names against its sha256 (a mismatch is an :class:`IntegrityError` naming the object,
and nothing of that version is installed), and installs the version in the cache registry under its
remote number — so every reading command (list, show, load, serve, verify) runs unchanged on the cache,
and loading re-checks the hashes as the local registry always does. The remote listing is the index:
``index rebuild`` syncs, then rebuilds the cache's SQLite index from its directories.

Tags live in ``tags/<name>/<seq>.json``: each change publishes the whole new map under the next sequence
number with the same conditional create, so concurrent taggers never lose an update (the loser re-reads
and re-applies). Deleting a version creates ``adapters/<name>/<N>.deleted`` (the manifest stays, so the
number is never reused); every client drops the version from its cache on its next sync. Removing a base,
and collecting the store's unreferenced objects, are not offered on an object store yet (refused with the fix).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adapterhub_local.errors import (
    AlreadyExistsError,
    FormatError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    RemoteError,
    UnsupportedError,
)
from adapterhub_local.registry import atomic
from adapterhub_local.registry.bases import BASE_FILE, BaseRecord
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard
from adapterhub_local.registry.index import IndexRow
from adapterhub_local.registry.names import is_version_text, parse_reference, validate_name, validate_tag
from adapterhub_local.registry.store import Registry

SCHEMES = ("s3://",)
MARKER = "registry.json"
CACHE_ENV = "ADAPTERHUB_CACHE"
COMMIT_ATTEMPTS = 1000
_MANIFEST_LIMIT = 16 << 20


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """Whether ``--registry`` names an object store rather than a directory."""
    return location is not None and str(location).startswith(SCHEMES)


def _s3_filesystem() -> Any:
    """s3fs configured from the environment (``AWS_ENDPOINT_URL`` for S3-compatible servers), with no
    listing cache: other writers change the store between our calls."""
    try:
        import s3fs
    except ImportError as exc:
        raise UnsupportedError("an s3:// registry needs the s3fs package",
                               "pip install 'adapterhub_local[s3]'") from exc
    client: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        client["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return s3fs.S3FileSystem(use_listings_cache=False, client_kwargs=client)


def default_cache(url: str) -> Path:
    """``$ADAPTERHUB_CACHE/<hash of the URL>`` (default ``~/.cache/adapterhub``): one cache per store."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adapterhub")
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


class ObjectStoreRegistry(Registry):
    """A :class:`Registry` whose versions are published to an object store; reads go through a local
    cache registry (``cache/registry``) and a blob cache (``cache/objects``)."""

    def __init__(self, url: str, *, cache: Path | None = None, fs: Any = None, create: bool = True) -> None:
        if not is_remote(url):
            raise InvalidNameError(f"{url!r} is not an object-store URL", "write it as s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.prefix = self.url.split("://", 1)[1]
        self.fs = fs if fs is not None else _s3_filesystem()
        self.cache = Path(cache) if cache is not None else default_cache(self.url)
        self.blobs = self.cache / "objects"
        with self._remote("open"):
            present = self.fs.exists(self._key(MARKER))
            if not present and not create:
                raise NotFoundError(f"registry {self.url} does not exist",
                                    "check --registry (a registry is created by `adapterhub base add`)")
            if not present:
                try:
                    self.fs.pipe_file(self._key(MARKER), json.dumps({"format": "adapterhub", "schema": 1}).encode(),
                                      mode="create")
                except FileExistsError:
                    pass  # another client created it first
                except FileNotFoundError:
                    raise NotFoundError(f"bucket of {self.url} does not exist",
                                        "create the bucket first (the registry lives under its prefix)") from None
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.remote_problems: dict[tuple[str, int], str] = {}
        """Versions in the store that could not be installed (damaged, malformed), with the reason."""
        super().__init__(self.cache / "registry", create=True)
        self.sync()

    # ------------------------------------------------------------ plumbing
    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    @contextlib.contextmanager
    def _remote(self, action: str) -> Iterator[None]:
        """Turn the store's errors into one line naming the store (a project error passes through)."""
        try:
            yield
        except (FileExistsError, FileNotFoundError):
            raise
        except (OSError, ValueError) as exc:
            raise RemoteError(f"cannot {action} {self.url}: {type(exc).__name__}: {exc}".splitlines()[0],
                              "check the bucket, the credentials and AWS_ENDPOINT_URL") from exc

    def _listing(self, *parts: str) -> list[str]:
        """Base names of the entries under a key prefix (empty when there is none)."""
        try:
            return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._key(*parts), detail=False))
        except FileNotFoundError:
            return []

    def upload_objects(self, directory: Path, files: dict[str, str]) -> None:
        """Upload each file (name → sha256) of ``directory`` to ``objects/<sha256>``, unless already there.
        Uploaded objects are invisible until a manifest names them."""
        with self._remote("upload to"):
            for fname, digest in sorted(files.items()):
                key = self._key("objects", digest)
                if not self.fs.exists(key):
                    self.fs.put_file(str(directory / fname), key)

    def fetch_object(self, digest: str) -> Path:
        """The blob with ``digest`` in the local cache, downloaded and checked first if missing."""
        path = self.blobs / digest
        if path.is_file():
            return path
        tmp = self.blobs / f".{digest}.{os.getpid()}.{id(self)}.tmp"
        try:
            with self._remote("download from"):
                try:
                    self.fs.get_file(self._key("objects", digest), str(tmp))
                except FileNotFoundError:
                    raise IntegrityError(f"{self.url}: object {digest[:12]} named by a manifest is missing",
                                         "restore it from a copy of the store, or re-publish the version") from None
            if atomic.sha256_file(tmp) != digest:
                raise IntegrityError(f"{self.url}: object {digest[:12]} does not match its sha256 (damaged)",
                                     "restore it from a copy of the store, or re-publish the version")
            tmp.chmod(0o444)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return path

    def _cache_blob(self, source: Path, digest: str) -> None:
        """Copy a local file whose sha256 is ``digest`` into the blob cache (checked; skipped if present)."""
        path = self.blobs / digest
        if path.is_file():
            return
        tmp = self.blobs / f".{digest}.{os.getpid()}.{id(self)}.tmp"
        try:
            shutil.copyfile(source, tmp)
            if atomic.sha256_file(tmp) == digest:
                tmp.chmod(0o444)
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _read_manifest(self, *parts: str) -> dict[str, Any]:
        with self._remote("read from"):
            data = self.fs.cat_file(self._key(*parts))
        if len(data) > _MANIFEST_LIMIT:
            raise FormatError(f"{self.url}/{'/'.join(parts)} is too large for a manifest", "remove it from the store")
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise FormatError(f"{self.url}/{'/'.join(parts)} is not JSON ({exc})", "remove it from the store") from None
        if not isinstance(parsed, dict):
            raise FormatError(f"{self.url}/{'/'.join(parts)} is not a JSON object", "remove it from the store")
        return parsed

    # ---------------------------------------------------------------- sync
    def _numbers(self, name: str) -> tuple[list[int], set[int]]:
        """Every version number of ``name`` ever committed (its manifests), and those deleted since."""
        validate_name(name, "adapter name")
        with self._remote("list"):
            entries = self._listing("adapters", name)
        numbers = {stem: int(stem) for e in entries if is_version_text(stem := e.rpartition(".")[0])}
        committed = sorted(numbers[e[:-5]] for e in entries if e.endswith(".json") and e[:-5] in numbers)
        deleted = {numbers[e[:-8]] for e in entries if e.endswith(".deleted") and e[:-8] in numbers}
        return committed, deleted

    def remote_versions(self, name: str) -> list[int]:
        """Live version numbers of ``name`` in the store (manifests without a deletion marker), ascending."""
        committed, deleted = self._numbers(name)
        return [v for v in committed if v not in deleted]

    def sync(self) -> int:
        """Install every base and version of the store that the cache lacks; returns versions installed."""
        with self._remote("list"):
            bases = [e[:-5] for e in self._listing("bases") if e.endswith(".json")]
            names = self._listing("adapters")
        for base in bases:
            with contextlib.suppress(InvalidNameError):
                validate_name(base, "base name")
                if not (self.layout.bases / base).exists():
                    self._install_base(base)
        installed = 0
        for name in names:
            try:
                validate_name(name, "adapter name")
            except InvalidNameError:
                continue
            have = set(self.versions_on_disk(name))
            committed, deleted = self._numbers(name)
            for version in sorted(have & deleted):  # deleted by another client: gone here too
                with contextlib.suppress(NotFoundError):
                    super().delete(f"{name}@{version}")
            for version in committed:
                if version in have or version in deleted:
                    continue
                try:
                    installed += self._install_version(name, version)
                    self.remote_problems.pop((name, version), None)
                except (IntegrityError, FormatError) as exc:  # refused on read; named when it is asked for
                    self.remote_problems[(name, version)] = f"{name}@{version} in {self.url}: {exc.problem}"
            if self.versions_on_disk(name):
                with contextlib.suppress(FormatError):  # a malformed tag map: the cache keeps the last good one
                    self._sync_tags(name)
        return installed

    def locate(self, ref: str) -> tuple[str, int]:
        """As the local registry, but a version that is in the store and was refused on read is named as
        damaged — never answered by an older version or by "does not exist"."""
        parsed = parse_reference(ref)
        if parsed.name is not None and parsed.tag is None:
            damaged = sorted(v for (n, v) in self.remote_problems if n == parsed.name)
            local = self.versions_on_disk(parsed.name)
            wanted = parsed.version if parsed.version is not None else (
                damaged[-1] if damaged and (not local or damaged[-1] > local[-1]) else None)
            if wanted is not None and (parsed.name, wanted) in self.remote_problems:
                raise IntegrityError(self.remote_problems[(parsed.name, wanted)],
                                     "restore the store's object from a copy, or publish a new version")
        return super().locate(ref)

    def _install_base(self, name: str) -> None:
        manifest = self._read_manifest("bases", f"{name}.json")
        files = manifest.get("files")
        if not isinstance(files, dict) or BASE_FILE not in files:
            raise FormatError(f"{self.url}/bases/{name}.json has no file list", "remove it from the store")
        staged = self.new_staging()
        try:
            self._fill(staged, files)
            atomic.seal_directory(staged)
            with self.locked():
                target = self.layout.bases / name
                if not target.exists():
                    atomic.publish_directory(staged, target)
        finally:
            with contextlib.suppress(OSError):
                atomic.remove_tree(staged)
        self.base(name)  # the record is untrusted input: parse it now, so a bad one is named at once

    def _install_version(self, name: str, version: int) -> int:
        data = self._read_manifest("adapters", name, f"{version}.json")
        card = AdapterCard.from_dict(data, f"{self.url}/adapters/{name}/{version}.json")
        if (card.name, card.version) != (name, version):
            raise FormatError(f"{self.url}/adapters/{name}/{version}.json describes {card.ref}",
                              "remove the manifest from the store")
        staged = self.new_staging()
        try:
            self._fill(staged, card.files)
            atomic.write_text_atomic(staged / CARD_FILE, card.to_json())
            atomic.seal_directory(staged)
            with self.locked():
                target = self.layout.version_dir(name, version)
                if target.exists():
                    return 0
                self.layout.raise_highwater(name, version)
                atomic.publish_directory(staged, target)
                self._after_commit(lambda index: index.upsert(self.index_row(card)))
        finally:
            with contextlib.suppress(OSError):
                atomic.remove_tree(staged)
        return 1

    def _fill(self, staged: Path, files: dict[str, Any]) -> None:
        for fname, digest in sorted(files.items()):
            if not (isinstance(fname, str) and isinstance(digest, str) and len(digest) == 64
                    and "/" not in fname and not fname.startswith(".")):
                raise FormatError(f"{self.url}: manifest entry {fname!r} is not a plain file name with a sha256",
                                  "remove the manifest from the store")
            shutil.copyfile(self.fetch_object(digest), staged / fname)

    # ------------------------------------------------------------ publish
    def commit_manifest(self, card: AdapterCard) -> AdapterCard:
        """Claim the next free number of ``card.name`` with a conditional create of its manifest (the
        commit point). The card's files must already be uploaded."""
        for _ in range(COMMIT_ATTEMPTS):
            card.version = max([0, *self._numbers(card.name)[0]]) + 1  # deleted numbers stay used
            try:
                with self._remote("publish to"):
                    self.fs.pipe_file(self._key("adapters", card.name, f"{card.version}.json"),
                                      card.to_json().encode(), mode="create")
                return card
            except FileExistsError:
                continue  # another writer took that number: list again
        raise RemoteError(f"could not claim a version number of {card.name!r} in {self.url} after "
                          f"{COMMIT_ATTEMPTS} tries", "run the command again")

    def publish(self, staged: Path, card: AdapterCard) -> AdapterCard:
        """Upload, commit remotely, then install the version in the cache under the number it got."""
        self.upload_objects(staged, card.files)
        for fname, digest in card.files.items():  # seed the blob cache: the sync below need not download them
            self._cache_blob(staged / fname, digest)
        self.commit_manifest(card)
        with contextlib.suppress(FileNotFoundError):
            (staged / CARD_FILE).unlink()
        self.sync()  # installs this version (and any others published meanwhile) from the store
        return self.card_of(card.name, card.version)

    def add_base(self, name: str, source: str, revision: str | None = None) -> BaseRecord:
        """Register a base locally, then publish it: objects first, the manifest by conditional create."""
        validate_name(name, "base name")
        with self._remote("read from"):
            if self.fs.exists(self._key("bases", f"{name}.json")):
                raise AlreadyExistsError(f"base {name!r} is already registered in {self.url}", "pick another name")
        record = super().add_base(name, source, revision)
        files = {p.name: atomic.sha256_file(p) for p in sorted(record.path.iterdir())
                 if p.is_file() and not p.name.startswith(".")}  # dot files are local caches (fingerprint)
        self.upload_objects(record.path, files)
        manifest = {"name": name, "files": files}
        try:
            with self._remote("publish to"):
                self.fs.pipe_file(self._key("bases", f"{name}.json"), json.dumps(manifest).encode(), mode="create")
        except FileExistsError:
            with self.locked():
                self._trash(record.path)
            raise AlreadyExistsError(f"base {name!r} was registered in {self.url} meanwhile",
                                     "pick another name") from None
        return record

    def rebuild_index(self) -> int:
        self.sync()
        return super().rebuild_index()

    def list_adapters(self, name: str | None = None) -> list[IndexRow]:
        """The listing after a sync: what other writers published is listed (and so served after a
        server's reload) as soon as it is committed."""
        self.sync()
        return super().list_adapters(name)

    # --------------------------------------------------------------- tags
    def remote_tags(self, name: str) -> tuple[int, dict[str, int]]:
        """The latest tag map of ``name`` in the store and its sequence number (0: never tagged)."""
        with self._remote("list"):
            entries = self._listing("tags", name)
        seqs = sorted(int(e[:-5]) for e in entries if e.endswith(".json") and is_version_text(e[:-5]))
        if not seqs:
            return 0, {}
        data = self._read_manifest("tags", name, f"{seqs[-1]}.json").get("tags")
        if not isinstance(data, dict) or not all(isinstance(t, str) and isinstance(v, int) for t, v in data.items()):
            raise FormatError(f"{self.url}/tags/{name}/{seqs[-1]}.json is not a tag map", "remove it from the store")
        return seqs[-1], dict(data)

    def _change_tags(self, name: str, change: Callable[[dict[str, int]], None]) -> dict[str, int]:
        """Apply ``change`` to the latest tag map and publish the result as the next map, by the same
        conditional create as versions (a concurrent tagger makes us re-read and re-apply)."""
        for _ in range(COMMIT_ATTEMPTS):
            seq, tags = self.remote_tags(name)
            change(tags)
            try:
                with self._remote("publish to"):
                    self.fs.pipe_file(self._key("tags", name, f"{seq + 1}.json"),
                                      json.dumps({"tags": tags}, sort_keys=True).encode(), mode="create")
            except FileExistsError:
                continue
            self._install_tags(name, tags)
            return tags
        raise RemoteError(f"could not update the tags of {name!r} in {self.url} after {COMMIT_ATTEMPTS} tries",
                          "run the command again")

    def _sync_tags(self, name: str) -> None:
        _, tags = self.remote_tags(name)
        if tags != self.tag_map(name):
            self._install_tags(name, tags)

    def _install_tags(self, name: str, tags: dict[str, int]) -> None:
        with self.locked():
            self._write_tags(name, tags)
            self._after_commit(lambda index: index.set_tags(name, tags))

    def tag(self, ref: str, tag: str) -> AdapterCard:
        """Point ``name:tag`` at the version ``ref`` resolves to, in the store (then in the cache)."""
        validate_tag(tag)
        self.sync()
        card = self.resolve(ref)

        def point(tags: dict[str, int]) -> None:
            tags[tag] = card.version

        self._change_tags(card.name, point)
        return card

    def untag(self, name: str, tag: str) -> None:
        validate_name(name, "adapter name")
        validate_tag(tag)

        def drop(tags: dict[str, int]) -> None:
            if tag not in tags:
                raise NotFoundError(f"adapter {name!r} has no tag {tag!r}", "see `adapterhub list --tags`")
            del tags[tag]

        self._change_tags(name, drop)

    # ----------------------------------------------------- not offered yet
    def _unsupported(self, what: str) -> UnsupportedError:
        return UnsupportedError(f"{what} is not supported on an object-store registry ({self.url}) yet",
                                "publish a new version instead, or use a local --registry")

    def delete(self, ref: str) -> str:
        """Mark a version deleted in the store (``adapters/<name>/<N>.deleted``, created once), then remove it
        from the cache. Its manifest stays, so its number is never reused; its objects stay for ``gc`` of
        the store (not offered yet)."""
        self.sync()
        name, version = self.locate(ref)
        try:
            with self._remote("delete in"):
                self.fs.pipe_file(self._key("adapters", name, f"{version}.deleted"), b"", mode="create")
        except FileExistsError:
            pass  # deleted by another client meanwhile: the same outcome
        with contextlib.suppress(NotFoundError):
            super().delete(f"{name}@{version}")
        self.remote_problems.pop((name, version), None)
        return f"{name}@{version}"

    def remove_base(self, name: str) -> None:
        raise self._unsupported("removing a base")

