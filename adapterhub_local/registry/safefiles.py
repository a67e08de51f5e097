"""Opening files that are untrusted input without being tricked by them.

An import directory, or a registry someone tampered with, may hold symlinks that lead elsewhere, FIFOs
that block a reader forever, or device files. Every path is checked with ``lstat`` first and opened with
``O_NOFOLLOW | O_NONBLOCK``, and the opened descriptor is checked again with ``fstat``, so a file is read
only if it is a regular file inside the directory it is supposed to be in — and a FIFO or device is
refused without ever being read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from adapterhub_local.errors import FormatError, StorageError

_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"


def is_inside(path: Path, root: Path) -> bool:
    """True if ``path`` (symlinks resolved) lies inside ``root`` (symlinks resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def checked_path(path: Path, root: Path, *, follow_inside: bool, fix: str) -> Path:
    """The path to open for ``path``: refuse symlinks (or, with ``follow_inside``, symlinks whose target
    leaves ``root``) and anything that is not a regular file. Nothing is opened."""
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError as exc:
        raise FormatError(f"{path} is missing", fix) from exc
    except OSError as exc:
        raise FormatError(f"cannot inspect {path}: {exc.strerror}", fix) from exc
    if stat.S_ISLNK(info.st_mode):
        if not follow_inside:
            raise FormatError(f"{path} is a symlink; it is not followed", fix)
        if not is_inside(path, root):
            raise FormatError(f"{path} is a symlink leading outside {root}; it is not followed",
                              "copy the real file into the directory instead of linking to it")
        path = Path(os.path.realpath(path))
        try:
            info = path.stat()
        except OSError as exc:
            raise FormatError(f"{path} (symlink target) cannot be read: {exc.strerror}", fix) from exc
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{path} is {_kind(info.st_mode)}; it is not read", fix)
    return path


@contextlib.contextmanager
def open_regular(path: Path, root: Path, *, follow_inside: bool = False,
                 fix: str = "replace it with a regular file") -> Iterator[BinaryIO]:
    """Open an untrusted file for reading (see module doc); raise :class:`FormatError` naming it."""
    target = checked_path(path, root, follow_inside=follow_inside, fix=fix)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}", fix) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped after the lstat: still refuse
            raise FormatError(f"{path} changed into {_kind(os.fstat(fd).st_mode)} while being opened", fix)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_regular(path: Path, root: Path, *, follow_inside: bool = False, limit: int = 64 << 20,
                 fix: str = "replace it with a regular file") -> bytes:
    """The bytes of an untrusted regular file (refused above ``limit`` bytes)."""
    with open_regular(path, root, follow_inside=follow_inside, fix=fix) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path} is larger than {limit} bytes", fix)
    return data


def sha256_regular(path: Path, root: Path) -> str:
    """Hex sha256 of a regular file inside ``root`` (symlinks refused)."""
    digest = hashlib.sha256()
    with open_regular(path, root, fix="restore the version from an export or delete it") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def storage_error(exc: OSError, path: Path, action: str) -> StorageError:
    """One clear error for a failed write (disk full, read-only file system, permissions)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space (or choose another --registry) and run the command again; nothing was published"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the registry is read-only for you; use a writable --registry for commands that change it"
    else:
        fix = "check the disk and run the command again; nothing was published"
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}", fix)


def copy_regular(source: Path, root: Path, target: Path, *, follow_inside: bool = True) -> str:
    """Copy an untrusted file into a new file ``target`` (fsync'd); return the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    with open_regular(source, root, follow_inside=follow_inside,
                      fix="give a directory holding regular files") as handle:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise storage_error(exc, target, "create") from exc
        try:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            raise storage_error(exc, target, "write") from exc
        finally:
            os.close(fd)
    return digest.hexdigest()
