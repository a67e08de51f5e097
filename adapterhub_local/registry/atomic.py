"""Crash-safe file system primitives: fsync'd writes, staged directories published by one rename,
and an inter-process lock (``flock``, released by the kernel even on SIGKILL).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

STAGING_DIR = ".staging"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def new_staging_dir(root: Path) -> Path:
    """A fresh private directory under ``root/.staging`` (named with the pid for garbage collection)."""
    staging = Path(root) / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / f"{os.getpid()}-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def seal_directory(directory: Path) -> None:
    """fsync every file and the directory, then make the files read-only (versions are immutable)."""
    for item in Path(directory).iterdir():
        if item.is_file():
            fsync_path(item)
            item.chmod(0o444)
    fsync_path(directory)


def publish_directory(staged: Path, target: Path) -> None:
    """Move a sealed staging directory into place with one ``rename``; refuse to replace anything.

    If making the rename durable fails, the rename is undone before the error propagates: an error
    from here always means nothing was published."""
    created = not target.parent.is_dir()
    try:
        if created:
            target.parent.mkdir(parents=True)
            fsync_path(target.parent.parent)
        if target.exists() or target.is_symlink():
            raise FileExistsError(target)
        os.rename(staged, target)
        try:
            fsync_path(target.parent)
        except BaseException:
            os.rename(target, staged)
            raise
    except BaseException:
        if created:  # leave no empty name directory behind either
            with contextlib.suppress(OSError):
                target.parent.rmdir()
        raise


def remove_tree(path: Path) -> None:
    """Delete a directory tree, making read-only files writable first. Symlinks inside are removed,
    never followed (nothing outside the tree is touched); a symlink at ``path`` itself is unlinked."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        path.chmod(0o755)
    for top, dirs, files in os.walk(path, followlinks=False):
        for item in [*dirs, *files]:
            full = os.path.join(top, item)
            with contextlib.suppress(OSError):
                if not os.path.islink(full):
                    os.chmod(full, 0o755 if os.path.isdir(full) else 0o644)
    shutil.rmtree(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
