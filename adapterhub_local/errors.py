"""The project's error family: every user or I/O problem names the thing and suggests the fix.

The CLI catches :class:`AdapterHubError` and prints ``str(error)`` on one line, then exits non-zero;
anything else escaping is a bug.
"""

from __future__ import annotations


class AdapterHubError(Exception):
    """Base class: ``problem`` says what is wrong, ``fix`` says what to do about it."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class InvalidNameError(AdapterHubError):
    """A name, version or tag that is not allowed (path traversal, bad characters)."""


class InvalidReferenceError(AdapterHubError):
    """A reference string that cannot be parsed."""


class NotFoundError(AdapterHubError):
    """A base, adapter, version or tag that the registry does not hold."""

    exit_code = 2


class AlreadyExistsError(AdapterHubError):
    """Something with that name is already registered."""


class IntegrityError(AdapterHubError):
    """Bytes on disk no longer match their recorded sha256, or a version is torn."""

    exit_code = 3


class StorageError(AdapterHubError):
    """The file system refused a write (disk full, read-only, permissions); nothing was half-published."""


class FormatError(AdapterHubError):
    """A file that is not what it claims (bad safetensors header, bad JSON, pickle where safetensors is needed)."""


class ShapeMismatchError(AdapterHubError):
    """An adapter tensor does not fit the base model it is meant for."""


class FingerprintMismatchError(AdapterHubError):
    """An adapter made for one base is being used with another."""


class ConfigError(AdapterHubError):
    """A recipe or configuration with one or more problems (all listed in one message)."""

    def __init__(self, problems: list[str], fix: str | None = None, *, what: str = "configuration") -> None:
        self.problems = list(problems)
        listing = "; ".join(self.problems)
        super().__init__(f"invalid {what}: {len(self.problems)} problem(s): {listing}", fix)


class UnsupportedError(AdapterHubError):
    """An operation that this adapter kind, base or machine cannot do (e.g. merging a soft prompt)."""


class RemoteError(AdapterHubError):
    """A Hugging Face Hub call failed (network, auth, missing repo)."""


class DistributedError(AdapterHubError):
    """One of several training processes lost the others (one failed, or hung past the timeout)."""
