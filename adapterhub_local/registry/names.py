"""Names and references: what may be called what, and how ``name``, ``name@3``, ``name:tag`` and
``sha256:<prefix>`` are parsed.

Names become directory names, so they are validated strictly: no path separators, no ``..``, no
absolute paths, a restricted character set, bounded length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub_local.errors import InvalidNameError, InvalidReferenceError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{4,64}$")

_NAME_RULE = (
    "use 1-100 characters from letters, digits, '.', '_' and '-', starting with a letter or digit "
    "(no '/', no '..', no absolute paths)"
)


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe registry name, else raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidNameError(f"invalid {what} {name!r}", _NAME_RULE)
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag (a letter first, so it never looks like a version)."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or ".." in tag:
        raise InvalidNameError(
            f"invalid tag {tag!r}",
            "use 1-64 characters from letters, digits, '.', '_' and '-', starting with a letter",
        )
    return tag


@dataclass(frozen=True)
class Reference:
    """A parsed adapter reference. Exactly one of the selectors (version, tag, sha_prefix) or none."""

    name: str | None
    version: int | None = None
    tag: str | None = None
    sha_prefix: str | None = None

    def __str__(self) -> str:
        if self.sha_prefix is not None:
            return f"sha256:{self.sha_prefix}"
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.tag is not None:
            return f"{self.name}:{self.tag}"
        return str(self.name)


_REF_HELP = "write NAME (latest), NAME@3 (version), NAME:prod (tag) or sha256:<hex prefix, 4+ chars>"


def parse_reference(text: str) -> Reference:
    """Parse a reference string; raise :class:`InvalidReferenceError` naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidReferenceError("empty adapter reference", _REF_HELP)
    text = text.strip()
    if text.startswith("sha256:"):
        prefix = text[len("sha256:") :].lower()
        if not _SHA_RE.match(prefix):
            raise InvalidReferenceError(f"invalid sha256 prefix in {text!r}", _REF_HELP)
        return Reference(name=None, sha_prefix=prefix)
    if "@" in text:
        name, _, version = text.partition("@")
        if not version.isdigit() or int(version) < 1:
            raise InvalidReferenceError(f"invalid version in {text!r}", _REF_HELP)
        return Reference(name=validate_name(name, "adapter name"), version=int(version))
    if ":" in text:
        name, _, tag = text.partition(":")
        return Reference(name=validate_name(name, "adapter name"), tag=validate_tag(tag))
    return Reference(name=validate_name(text, "adapter name"))
