"""The registry's directory layout, read as untrusted input.

Only what the registry itself could have written counts: real directories (never symlinks) with valid
names and canonical version numbers. Anything else is a *stray* that ``verify`` reports and no other
command follows, lists or deletes — so a planted symlink cannot make the registry read or remove
anything outside its root. Directories that vanish while being read (a concurrent delete) read as empty.

Per-name **high-water marks** (``.versions/<name>``) record the highest version number ever published,
so a number is never handed out twice even after the latest version was deleted, the name directory
removed, or the index rebuilt.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError, InvalidNameError
from adapterhub_local.registry import atomic
from adapterhub_local.registry.formats import read_json
from adapterhub_local.registry.names import is_version_text, validate_name, validate_tag
from adapterhub_local.registry.safefiles import read_regular

TAGS_FILE = "tags.json"
TEMP_FILE = re.compile(r"\.[A-Za-z0-9._-]+\.[0-9a-f]{32}\.tmp", re.ASCII)
"""What :func:`atomic.write_text_atomic` leaves behind if its writer is killed (gc removes them)."""
HIGHWATER_DIR = ".versions"
TAGS_FIX = "fix the file to map tag names to version numbers, or delete it and re-tag with `adapterhub tag`"


def _entries(directory: Path) -> list[tuple[str, int]]:
    """(name, lstat mode) of each entry; [] if the directory is missing or vanishes."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        try:
            out.append((name, (directory / name).lstat().st_mode))
        except FileNotFoundError:
            continue
    return out


def parse_tag_map(data: dict[str, Any], where: str, fix: str) -> dict[str, int]:
    """A tag map read from untrusted JSON (``where`` names its file or object): every tag a valid tag name,
    every version an integer >= 1 (not a boolean)."""
    tags: dict[str, int] = {}
    for tag, version in data.items():
        try:
            validate_tag(tag)
        except InvalidNameError as exc:
            raise FormatError(f"{where}: invalid tag {tag!r}", fix) from exc
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise FormatError(f"{where}: tag {tag!r} points at {version!r}, not a version number", fix)
        tags[tag] = version
    return tags


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidNameError:
        return False
    return True


class Layout:
    """Paths and listings under one registry root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.adapters = self.root / "adapters"
        self.bases = self.root / "bases"
        self.highwater_dir = self.root / HIGHWATER_DIR

    # ------------------------------------------------------------ listings
    def adapter_names(self) -> list[str]:
        return [n for n, mode in _entries(self.adapters) if stat.S_ISDIR(mode) and _valid_name(n)]

    def base_names(self) -> list[str]:
        return [n for n, mode in _entries(self.bases) if stat.S_ISDIR(mode) and _valid_name(n)]

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name`` (real directories with canonical numbers), ascending."""
        validate_name(name, "adapter name")
        if not self.is_real_dir(self.adapters / name):  # a planted symlink is never listed through
            return []
        return sorted(int(n) for n, mode in _entries(self.adapters / name)
                      if stat.S_ISDIR(mode) and is_version_text(n))

    def version_dir(self, name: str, version: int) -> Path:
        return self.adapters / validate_name(name, "adapter name") / str(int(version))

    def is_real_dir(self, path: Path) -> bool:
        try:
            return stat.S_ISDIR(path.lstat().st_mode)
        except FileNotFoundError:
            return False

    def symlinks_in(self, directory: Path) -> list[Path]:
        """Symlinks directly inside ``directory`` (the registry itself never writes one)."""
        return [directory / n for n, mode in _entries(directory) if stat.S_ISLNK(mode)]

    def strays(self) -> list[str]:
        """Entries no registry command wrote (symlinks, odd names, stray files): one line each."""
        out: list[str] = []
        for directory, what in ((self.adapters, "adapter"), (self.bases, "base")):
            for name, mode in _entries(directory):
                if stat.S_ISLNK(mode):
                    out.append(f"{directory.name}/{name} is a symlink; it is never followed — remove it")
                elif not stat.S_ISDIR(mode) or not _valid_name(name):
                    out.append(f"{directory.name}/{name} is not a valid {what} directory — remove it")
        for name in self.adapter_names():
            for entry, mode in _entries(self.adapters / name):
                if (entry == TAGS_FILE or TEMP_FILE.fullmatch(entry)) and stat.S_ISREG(mode):
                    continue
                if stat.S_ISLNK(mode):
                    out.append(f"adapters/{name}/{entry} is a symlink; it is never followed — remove it")
                elif not (stat.S_ISDIR(mode) and is_version_text(entry)):
                    out.append(f"adapters/{name}/{entry} is not a version directory — remove it")
        return out

    def temp_files(self) -> list[Path]:
        """Temporary files of killed writers (regular files only) beside tag files and high-water marks."""
        directories = [self.adapters / n for n in self.adapter_names()] + [self.highwater_dir]
        return [d / n for d in directories for n, mode in _entries(d)
                if TEMP_FILE.fullmatch(n) and stat.S_ISREG(mode)]

    # ---------------------------------------------------------------- tags
    def tags_path(self, name: str) -> Path:
        return self.adapters / validate_name(name, "adapter name") / TAGS_FILE

    def read_tags(self, name: str) -> dict[str, int]:
        """``tags.json`` of ``name``, checked: tag names valid, versions integers >= 1."""
        path = self.tags_path(name)
        if not path.exists() and not path.is_symlink():
            return {}
        try:
            data = read_json(path, "tag file", TAGS_FIX)
        except FormatError as exc:
            if "is missing" in exc.problem:  # vanished under a concurrent delete
                return {}
            raise
        return parse_tag_map(data, f"tag file {path}", TAGS_FIX)

    def write_tags(self, name: str, tags: dict[str, int]) -> None:
        atomic.write_text_atomic(self.tags_path(name), json.dumps(tags, indent=2, sort_keys=True))

    # ---------------------------------------------------------- high water
    def highwater_path(self, name: str) -> Path:
        return self.highwater_dir / validate_name(name, "adapter name")

    def highwater(self, name: str) -> int:
        """The highest version number ever published under ``name`` (0 if none was recorded)."""
        path = self.highwater_path(name)
        if not path.exists() and not path.is_symlink():
            return 0
        fix = (f"write the highest version number ever used for {name!r} into it (at least "
               f"{max(self.versions(name), default=0)})")
        text = read_regular(path, self.highwater_dir, limit=64, fix=fix).decode("ascii", "replace").strip()
        if not is_version_text(text):
            raise FormatError(f"version high-water mark {path} holds {text!r}, not a version number", fix)
        return int(text)

    def next_version(self, name: str) -> int:
        """The number the next published version of ``name`` gets (call under the registry lock)."""
        return max(self.highwater(name), max(self.versions(name), default=0)) + 1

    def raise_highwater(self, name: str, version: int) -> None:
        """Record that ``version`` was used (never lowers the mark); call under the registry lock."""
        if version > self.highwater(name):
            self.highwater_dir.mkdir(exist_ok=True)
            atomic.write_text_atomic(self.highwater_path(name), f"{version}\n")
