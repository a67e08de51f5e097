"""Names and references: what may be called what, and how ``name``, ``name@3``, ``name:tag`` and
``sha256:<prefix>`` are parsed.

Names become directory names, so they are validated strictly and on the *whole* string (``fullmatch``:
a trailing newline or space is refused, not trimmed): no path separators, no ``..``, no absolute paths,
no control characters, a restricted ASCII character set, bounded length, and no name that reads as
reference syntax (``sha256``). References are parsed in their canonical form only: no surrounding
whitespace, ASCII decimal versions without leading zeros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub_local.errors import InvalidNameError, InvalidReferenceError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", re.ASCII)
_TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}", re.ASCII)
_SHA_RE = re.compile(r"[0-9a-f]{4,64}", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
SHA_SCHEME = "sha256"
RESERVED_NAMES = frozenset({SHA_SCHEME})
"""Names that collide with reference syntax (``sha256:<prefix>``), compared case-insensitively."""

_NAME_RULE = (
    "use 1-100 characters from letters, digits, '.', '_' and '-', starting with a letter or digit "
    "(no '/', no '..', no absolute paths)"
)


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe registry name, else raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(f"invalid {what} {name!r}", _NAME_RULE)
    if name.lower() in RESERVED_NAMES:
        raise InvalidNameError(f"invalid {what} {name!r}: it collides with the reference syntax "
                               f"'{SHA_SCHEME}:<prefix>'", "choose another name")
    return name


def is_version_text(text: str) -> bool:
    """True if ``text`` is a canonical version number (ASCII digits, no leading zero, >= 1)."""
    return bool(_VERSION_RE.fullmatch(text))


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag (a letter first, so it never looks like a version)."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag) or ".." in tag:
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
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError("empty adapter reference", _REF_HELP)
    if text != text.strip() or any(not ch.isprintable() for ch in text):
        raise InvalidReferenceError(f"adapter reference {text!r} has whitespace or control characters",
                                    "write the reference without surrounding spaces or newlines")
    if text.lower().startswith(SHA_SCHEME + ":"):
        prefix = text[len(SHA_SCHEME) + 1 :].lower()
        if not _SHA_RE.fullmatch(prefix):
            raise InvalidReferenceError(f"invalid sha256 prefix in {text!r}", _REF_HELP)
        return Reference(name=None, sha_prefix=prefix)
    if "@" in text:
        name, _, version = text.partition("@")
        if not is_version_text(version):
            raise InvalidReferenceError(f"invalid version in {text!r}", _REF_HELP)
        return Reference(name=validate_name(name, "adapter name"), version=int(version))
    if ":" in text:
        name, _, tag = text.partition(":")
        return Reference(name=validate_name(name, "adapter name"), tag=validate_tag(tag))
    return Reference(name=validate_name(text, "adapter name"))
