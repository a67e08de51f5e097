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
``index rebuild`` syncs, then rebuilds the cache's SQLite index from its directories. What the store holds
is untrusted input (:mod:`~adapterhub_local.registry.bucket` reads it): a version, base or tag map refused
on read (damaged bytes, a malformed card, base record or tag map) raises, whenever it is asked for, the
error class the local registry raises for the same damage, naming the key and the fix — never answered
by an older cached map or version — and ``verify`` lists it (:meth:`ObjectStoreRegistry.stored_problems`),
as it does a key among a name's manifests that makes its version numbers untrustworthy (publishing that
name is refused until it is removed). A committed publish, tag or delete never reports failure because
the local cache could not be updated afterwards (a full disk): the next sync heals the cache.

Tags live in ``tags/<name>/<seq>.json``: each change publishes the whole new map under the next sequence
number with the same conditional create, so concurrent taggers never lose an update (the loser re-reads
and re-applies). Deleting a version creates ``adapters/<name>/<N>.deleted`` (the manifest stays, so the
number is never reused), then drops the tags pointing at it; every client drops the version from its cache
on its next sync; a client that lost the race to delete it gets :class:`NotFoundError`, as locally. Removing a base,
and collecting the store's unreferenced objects, are not offered on an object store yet (refused with the fix).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterhub_local.errors import (
    AdapterHubError,
    AlreadyExistsError,
    FormatError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    RemoteError,
    StorageError,
    UnsupportedError,
)
from adapterhub_local.registry import atomic
from adapterhub_local.registry.bases import BASE_FILE, BaseRecord
from adapterhub_local.registry.bucket import Bucket, default_cache, is_remote, s3_filesystem
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard
from adapterhub_local.registry.index import IndexRow
from adapterhub_local.registry.layout import parse_tag_map
from adapterhub_local.registry.names import is_version_text, parse_reference, validate_name, validate_tag
from adapterhub_local.registry.store import Registry

MARKER = "registry.json"
COMMIT_ATTEMPTS = 1000
_STORE_FIX = "restore it from a copy of the store, or delete the version (`adapterhub delete`) and import it again"


def _again(error: AdapterHubError) -> AdapterHubError:
    """A fresh error of the same class and text (a remembered problem is raised anew each time it is asked for)."""
    return type(error)(error.problem, error.fix)


class ObjectStoreRegistry(Registry):
    """A :class:`Registry` whose versions are published to an object store; reads go through a local
    cache registry (``cache/registry``) and a blob cache (``cache/objects``)."""

    def __init__(self, url: str, *, cache: Path | None = None, fs: Any = None, create: bool = True) -> None:
        if not is_remote(url):
            raise InvalidNameError(f"{url!r} is not an object-store URL", "write it as s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.cache = Path(cache) if cache is not None else default_cache(self.url)
        self.bucket = Bucket(self.url, fs if fs is not None else s3_filesystem(), self.cache / "objects")
        self.prefix, self.fs, self.blobs = self.bucket.prefix, self.bucket.fs, self.bucket.blobs
        with self.bucket.remote("open"):
            present = self.fs.exists(self.bucket.key(MARKER))
            if not present and not create:
                raise NotFoundError(f"registry {self.url} does not exist",
                                    "check --registry (a registry is created by `adapterhub base add`)")
            if not present:
                try:
                    marker = json.dumps({"format": "adapterhub", "schema": 1}).encode()
                    self.fs.pipe_file(self.bucket.key(MARKER), marker, mode="create")
                except FileExistsError:
                    pass  # another client created it first
                except FileNotFoundError:
                    raise NotFoundError(f"bucket of {self.url} does not exist",
                                        "create the bucket first (the registry lives under its prefix)") from None
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.remote_problems: dict[tuple[str, int], AdapterHubError] = {}
        """Versions in the store that could not be installed (damaged, malformed), with the error they raise."""
        self.base_problems: dict[str, AdapterHubError] = {}
        """Bases in the store that could not be installed, with the error :meth:`base` raises for them."""
        self.tag_problems: dict[str, AdapterHubError] = {}
        """Names whose latest tag map in the store was refused at the last sync (the cache's older map is then
        never served in its place)."""
        super().__init__(self.cache / "registry", create=True)
        self.sync()

    def fetch_object(self, digest: str, what: str | None = None) -> Path:
        """The blob with ``digest`` from the local blob cache (keyed by content hash), downloaded and checked
        first if missing (see :meth:`Bucket.fetch_object`)."""
        return self.bucket.fetch_object(digest, what)

    # ---------------------------------------------------------------- sync
    def remote_versions(self, name: str) -> list[int]:
        """Live version numbers of ``name`` in the store (manifests without a deletion marker), ascending."""
        committed, deleted, _ = self.bucket.numbers(name)
        return [v for v in committed if v not in deleted]

    def sync(self) -> int:
        """Install every base and version of the store that the cache lacks; returns versions installed."""
        with self.bucket.remote("list"):
            bases = [e[:-5] for e in self.bucket.listing("bases") if e.endswith(".json")]
            names = self.bucket.listing("adapters")
        for base in bases:
            with contextlib.suppress(InvalidNameError):
                validate_name(base, "base name")
                if not (self.layout.bases / base).exists():
                    try:
                        self._install_base(base)
                        self.base_problems.pop(base, None)
                    except (IntegrityError, FormatError) as exc:  # refused on read; named when it is asked for
                        self.base_problems[base] = exc
        installed = 0
        for name in names:
            try:
                validate_name(name, "adapter name")
            except InvalidNameError:
                continue
            have = set(self.versions_on_disk(name))
            committed, deleted, _ = self.bucket.numbers(name)
            for version in deleted:
                self.remote_problems.pop((name, version), None)
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
                    self.remote_problems[(name, version)] = type(exc)(f"{name}@{version}: {exc.problem}",
                                                                      exc.fix or _STORE_FIX)
            if self.versions_on_disk(name):
                try:
                    self._sync_tags(name)
                    self.tag_problems.pop(name, None)
                except FormatError as exc:  # refused on read: resolving a tag names it (see tag_map)
                    self.tag_problems[name] = exc
        return installed

    def stored_problems(self) -> list[str]:
        """What the last sync refused from the store (damaged or malformed versions, bases), and keys that
        make a name's version numbers untrustworthy: ``verify`` reports these beside the cache's problems."""
        self.sync()
        problems = [str(e) for _, e in sorted(self.base_problems.items())]
        problems += [str(e) for _, e in sorted(self.remote_problems.items())]
        with self.bucket.remote("list"):
            names = self.bucket.listing("adapters")
        for name in names:
            with contextlib.suppress(InvalidNameError):
                problems += [str(self.bucket.counter_error(name, stray)) for stray in self.bucket.numbers(name)[2]]
        return problems

    def _refused_version(self, ref: str) -> tuple[str, int] | None:
        """(name, N) if ``ref`` names — or, as the latest, means — a version the store holds but that was
        refused on read."""
        parsed = parse_reference(ref)
        if parsed.name is None or parsed.tag is not None:
            return None
        damaged = sorted(v for (n, v) in self.remote_problems if n == parsed.name)
        local = self.versions_on_disk(parsed.name)
        wanted = parsed.version if parsed.version is not None else (
            damaged[-1] if damaged and (not local or damaged[-1] > local[-1]) else None)
        return (parsed.name, wanted) if wanted is not None and (parsed.name, wanted) in self.remote_problems else None

    def locate(self, ref: str) -> tuple[str, int]:
        """As the local registry, but a version that is in the store and was refused on read raises the error
        that refused it — never answered by an older version or by "does not exist"."""
        refused = self._refused_version(ref)
        if refused is not None:
            raise _again(self.remote_problems[refused])
        return super().locate(ref)

    def tag_map(self, name: str) -> dict[str, int]:
        """The tag map of ``name``; if the store's latest map was refused at the last sync, that error (the
        cache's older map is never served in its place)."""
        if name in self.tag_problems:
            raise _again(self.tag_problems[name])
        return super().tag_map(name)

    def base(self, name: str) -> BaseRecord:
        """As the local registry; a base the store holds but that was refused on read raises that error."""
        if name in self.base_problems and not (self.layout.bases / name).exists():
            raise _again(self.base_problems[name])
        return super().base(name)

    def _install_base(self, name: str) -> None:
        """Fetch a base into the cache; its record is parsed before it is installed (a bad one never is)."""
        where = f"{self.url}/bases/{name}.json"
        fix = (f"restore {where} and the objects it names from a copy of the store, or register the base under "
               "another name with `adapterhub base add`")
        files = self.bucket.read_manifest("bases", f"{name}.json", fix=fix).get("files")
        if not isinstance(files, dict) or BASE_FILE not in files:
            raise FormatError(f"{where} has no file list naming {BASE_FILE}", fix)
        staged = self.new_staging()
        try:
            directory = staged / name  # BaseRecord checks the record's name against its directory's
            directory.mkdir()
            self._fill(directory, files, where)
            try:
                BaseRecord.load(directory)
            except FormatError as exc:
                raise FormatError(exc.problem.replace(str(directory / BASE_FILE), f"{where} (its {BASE_FILE})"),
                                  fix) from None
            atomic.seal_directory(directory)
            with self.locked():
                target = self.layout.bases / name
                if not target.exists():
                    atomic.publish_directory(directory, target)
        finally:
            with contextlib.suppress(OSError):
                atomic.remove_tree(staged)

    def _install_version(self, name: str, version: int) -> int:
        where = f"{self.url}/adapters/{name}/{version}.json"
        data = self.bucket.read_manifest("adapters", name, f"{version}.json", fix=_STORE_FIX)
        card = AdapterCard.from_dict(data, where)
        if (card.name, card.version) != (name, version):
            raise FormatError(f"{where} describes {card.ref}", _STORE_FIX)
        staged = self.new_staging()
        try:
            self._fill(staged, card.files, where)
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

    def _fill(self, staged: Path, files: dict[str, Any], where: str) -> None:
        """Copy each file the manifest ``where`` lists from the (checked) blob cache into ``staged``."""
        for fname, digest in sorted(files.items()):
            if not (isinstance(fname, str) and isinstance(digest, str) and len(digest) == 64
                    and "/" not in fname and not fname.startswith(".")):
                raise FormatError(f"{where}: entry {fname!r} is not a plain file name with a sha256",
                                  "remove the manifest from the store")
            shutil.copyfile(self.fetch_object(digest, f"{where}: {fname}"), staged / fname)

    # ------------------------------------------------------------ publish
    def commit_manifest(self, card: AdapterCard) -> AdapterCard:
        """Claim the next free number of ``card.name`` with a conditional create of its manifest (the
        commit point). The card's files must already be uploaded."""
        for _ in range(COMMIT_ATTEMPTS):
            committed, deleted, strays = self.bucket.numbers(card.name)
            if strays:
                raise self.bucket.counter_error(card.name, strays[0])
            card.version = max([0, *committed, *deleted]) + 1  # deleted numbers stay used
            try:
                with self.bucket.remote("publish to"):
                    self.fs.pipe_file(self.bucket.key("adapters", card.name, f"{card.version}.json"),
                                      card.to_json().encode(), mode="create")
                return card
            except FileExistsError:
                continue  # another writer took that number: list again
        raise RemoteError(f"could not claim a version number of {card.name!r} in {self.url} after "
                          f"{COMMIT_ATTEMPTS} tries", "run the command again")

    def publish(self, staged: Path, card: AdapterCard) -> AdapterCard:
        """Upload, commit remotely, then install the version in the cache under the number it got."""
        self.bucket.upload_objects(staged, card.files)
        for fname, digest in card.files.items():  # seed the blob cache: the sync below need not download them
            self.bucket.cache_blob(staged / fname, digest)
        self.commit_manifest(card)
        with contextlib.suppress(FileNotFoundError):
            (staged / CARD_FILE).unlink()
        try:  # the create was the commit: nothing after it may report failure (the next sync installs it)
            self.sync()  # installs this version (and any others published meanwhile) from the store
            return self.card_of(card.name, card.version)
        except (AdapterHubError, OSError):
            return card

    def add_base(self, name: str, source: str, revision: str | None = None) -> BaseRecord:
        """Register a base locally, then publish it: objects first, the manifest by conditional create."""
        validate_name(name, "base name")
        with self.bucket.remote("read from"):
            if self.fs.exists(self.bucket.key("bases", f"{name}.json")):
                raise AlreadyExistsError(f"base {name!r} is already registered in {self.url}", "pick another name")
        record = super().add_base(name, source, revision)
        files = {p.name: atomic.sha256_file(p) for p in sorted(record.path.iterdir())
                 if p.is_file() and not p.name.startswith(".")}  # dot files are local caches (fingerprint)
        self.bucket.upload_objects(record.path, files)
        manifest = {"name": name, "files": files}
        try:
            with self.bucket.remote("publish to"):
                self.fs.pipe_file(self.bucket.key("bases", f"{name}.json"), json.dumps(manifest).encode(),
                                  mode="create")
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
        with self.bucket.remote("list"):
            entries = self.bucket.listing("tags", name)
        seqs = sorted(int(e[:-5]) for e in entries if e.endswith(".json") and is_version_text(e[:-5]))
        if not seqs:
            return 0, {}
        where = f"{self.url}/tags/{name}/{seqs[-1]}.json"
        fix = f"remove {where} from the store (the map before it applies again), then re-tag with `adapterhub tag`"
        data = self.bucket.read_manifest("tags", name, f"{seqs[-1]}.json", fix=fix)
        if set(data) != {"tags"} or not isinstance(data["tags"], dict):
            raise FormatError(f"{where} is not a tag map ({{\"tags\": {{tag: version}}}})", fix)
        return seqs[-1], parse_tag_map(data["tags"], where, fix)

    def _change_tags(self, name: str, change: Callable[[dict[str, int]], None]) -> dict[str, int]:
        """Apply ``change`` to the latest tag map and publish the result as the next map, by the same
        conditional create as versions (a concurrent tagger makes us re-read and re-apply)."""
        for _ in range(COMMIT_ATTEMPTS):
            seq, tags = self.remote_tags(name)
            change(tags)
            try:
                with self.bucket.remote("publish to"):
                    self.fs.pipe_file(self.bucket.key("tags", name, f"{seq + 1}.json"),
                                      json.dumps({"tags": tags}, sort_keys=True).encode(), mode="create")
            except FileExistsError:
                continue
            self.tag_problems.pop(name, None)
            with contextlib.suppress(StorageError, OSError):  # committed: the next sync heals the cache
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
        name, version = self._refused_version(ref) or self.locate(ref)  # a damaged version can be deleted
        try:
            with self.bucket.remote("delete in"):
                self.fs.pipe_file(self.bucket.key("adapters", name, f"{version}.deleted"), b"", mode="create")
        except FileExistsError:
            self.sync()
            raise NotFoundError(f"adapter version {name}@{version} was deleted by another client meanwhile",
                                "see `adapterhub list`") from None
        self.remote_problems.pop((name, version), None)

        def drop(tags: dict[str, int]) -> None:
            for tag in [t for t, v in tags.items() if v == version]:
                del tags[tag]

        with contextlib.suppress(AdapterHubError, OSError):  # the marker was the commit: the rest is clean-up
            if version in self.remote_tags(name)[1].values():  # tags pointing at it go, as in a local delete
                self._change_tags(name, drop)
            super().delete(f"{name}@{version}")  # (the next sync heals a cache this could not update)
        return f"{name}@{version}"

    def remove_base(self, name: str) -> None:
        raise self._unsupported("removing a base")

