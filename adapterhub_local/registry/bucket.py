"""The object store behind an S3 registry, read as untrusted input: keys under the registry's prefix,
listings, manifests (one bounded JSON object, no duplicate keys), content-addressed objects and the local
blob cache that holds them (keyed by sha256, checked on download), and the listing of a name's version
numbers. Errors of the store become one :class:`RemoteError` line naming it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError, IntegrityError, RemoteError, UnsupportedError
from adapterhub_local.registry import atomic
from adapterhub_local.registry.formats import parse_json_object
from adapterhub_local.registry.names import is_version_text, validate_name

SCHEMES = ("s3://",)
CACHE_ENV = "ADAPTERHUB_CACHE"
_MANIFEST_LIMIT = 16 << 20


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """Whether ``--registry`` names an object store rather than a directory."""
    return location is not None and str(location).startswith(SCHEMES)


def s3_filesystem() -> Any:
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


class Bucket:
    """Keys under ``url``'s prefix through the filesystem ``fs``, with the blob cache ``blobs``."""

    def __init__(self, url: str, fs: Any, blobs: Path) -> None:
        self.url = url
        self.prefix = url.split("://", 1)[1]
        self.fs = fs
        self.blobs = blobs

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    @contextlib.contextmanager
    def remote(self, action: str) -> Iterator[None]:
        """Turn the store's errors into one line naming the store (a project error passes through)."""
        try:
            yield
        except (FileExistsError, FileNotFoundError):
            raise
        except (OSError, ValueError) as exc:
            raise RemoteError(f"cannot {action} {self.url}: {type(exc).__name__}: {exc}".splitlines()[0],
                              "check the bucket, the credentials and AWS_ENDPOINT_URL") from exc

    def listing(self, *parts: str) -> list[str]:
        """Base names of the entries under a key prefix (empty when there is none)."""
        try:
            return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(*parts), detail=False))
        except FileNotFoundError:
            return []

    def upload_objects(self, directory: Path, files: dict[str, str]) -> None:
        """Upload each file (name → sha256) of ``directory`` to ``objects/<sha256>``, unless already there.
        Uploaded objects are invisible until a manifest names them."""
        with self.remote("upload to"):
            for fname, digest in sorted(files.items()):
                key = self.key("objects", digest)
                if not self.fs.exists(key):
                    self.fs.put_file(str(directory / fname), key)

    def fetch_object(self, digest: str, what: str | None = None) -> Path:
        """The blob with ``digest`` in the local cache, downloaded and checked first if missing (``what``
        names it in errors: the manifest and file that refer to it). The cache is keyed by content hash, so
        a cached blob always holds the bytes its name promises."""
        what = f"{what} (object {digest[:12]})" if what else f"{self.url}: object {digest[:12]}"
        path = self.blobs / digest
        if path.is_file():
            return path
        tmp = self.blobs / f".{digest}.{os.getpid()}.{id(self)}.tmp"
        try:
            with self.remote("download from"):
                try:
                    self.fs.get_file(self.key("objects", digest), str(tmp))
                except FileNotFoundError:
                    raise IntegrityError(f"{what} is missing from the store",
                                         "restore it from a copy of the store, or re-publish the version") from None
            if atomic.sha256_file(tmp) != digest:
                raise IntegrityError(f"{what} does not match its sha256 (damaged)",
                                     "restore it from a copy of the store, or re-publish the version")
            tmp.chmod(0o444)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return path

    def cache_blob(self, source: Path, digest: str) -> None:
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

    def read_manifest(self, *parts: str, fix: str = "remove it from the store") -> dict[str, Any]:
        """A manifest read as untrusted input: one JSON object, no duplicate keys, bounded size."""
        where = f"{self.url}/{'/'.join(parts)}"
        with self.remote("read from"):
            data = self.fs.cat_file(self.key(*parts))
        if len(data) > _MANIFEST_LIMIT:
            raise FormatError(f"{where} is too large for a manifest", fix)
        return parse_json_object(data, where, "", fix)

    def numbers(self, name: str) -> tuple[list[int], set[int], list[str]]:
        """Every version number of ``name`` ever committed (its manifests ``N.json``), the numbers marked
        deleted (``N.deleted``), and the keys under ``adapters/<name>/`` that are neither (no client writes
        those)."""
        validate_name(name, "adapter name")
        with self.remote("list"):
            entries = self.listing("adapters", name)
        committed: list[int] = []
        deleted: set[int] = set()
        strays: list[str] = []
        for entry in entries:
            stem, _, suffix = entry.rpartition(".")
            if is_version_text(stem) and suffix in ("json", "deleted"):
                (committed.append if suffix == "json" else deleted.add)(int(stem))
            else:
                strays.append(entry)
        return sorted(committed), deleted, strays

    def counter_error(self, name: str, stray: str) -> FormatError:
        """The error for a key that makes the version numbers of ``name`` untrustworthy."""
        return FormatError(f"{self.url}/adapters/{name}/{stray} is not a version manifest (<N>.json) or deletion "
                           f"marker (<N>.deleted), so the version numbers of {name!r} cannot be trusted",
                           "remove it from the store: the highest version number ever used is then read from the "
                           "manifests and markers again")
