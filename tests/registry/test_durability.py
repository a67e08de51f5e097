"""The index is a cache and writes are all-or-nothing (issue 10 item 9): corrupt or missing ``index.db``
is rebuilt (or bypassed) by itself; a read-only registry still lists, shows, verifies, exports and loads;
a full disk at any write gives one clear error and publishes nothing. On both back ends (issue 16): on S3
the index is the client's cache's, and a full local disk strikes the client while it publishes — before
the store's commit nothing is published, after it the command succeeds and the cache heals at the next
sync (the write-only-before-commit rule of a local registry becomes "never fail after the commit")."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import NotImplementedType
from typing import Any

import pytest

from adapterhub_local.errors import StorageError
from adapterhub_local.registry import Registry
from adapterhub_local.registry.index import Index
from adapterhub_local.registry.maintenance import rebuild_index, verify
from tests.registry.attack_kit import adapter_dir, assert_nothing_published, lora_tensors
from tests.registry.backends import Backend, local_only


@pytest.fixture
def reg(backend: Backend, tmp_path: Path, tiny_llama_dir: Path) -> Registry:
    """The backend's first client: base ``tiny``, versions x@1, x@2, y@1, tag x:prod → 1."""
    registry = backend.registry
    registry.add_base("tiny", str(tiny_llama_dir))
    for seed, name in enumerate(("x", "x", "y")):
        registry.register_adapter(name, adapter_dir(tmp_path / f"src{seed}", tensors=lora_tensors(seed=seed)), "tiny")
    registry.tag("x@1", "prod")
    return registry


def _other_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE adapters (name TEXT, version INTEGER)")
    conn.execute("INSERT INTO adapters VALUES ('ghost', 9)")
    conn.commit()
    conn.close()


def _replaced_by_other_schema(path: Path) -> None:
    path.unlink()
    _other_schema(path)


def _replaced_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGE: dict[str, Callable[[Path], object]] = {
    "garbage bytes": lambda p: p.write_bytes(b"this is not a database" * 100),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:300]),
    "zeroed header": lambda p: p.write_bytes(b"\0" * 100 + p.read_bytes()[100:]),
    "other schema": _replaced_by_other_schema,
    "missing": lambda p: p.unlink(),
    "a directory": _replaced_by_directory,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_index_is_rebuilt_or_bypassed(backend: Backend, reg: Registry, damage: str) -> None:
    expected = [(r.ref, r.sha256) for r in reg.list_adapters()]
    sha = reg.resolve("y").weights_sha256
    index = reg.root / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    DAMAGE[damage](index)
    if damage != "missing":
        with pytest.raises(sqlite3.DatabaseError):  # the damage is real
            Index(index)
    fresh = backend.reopen()
    assert [(r.ref, r.sha256) for r in fresh.list_adapters()] == expected
    assert fresh.resolve(f"sha256:{sha[:8]}").ref == "y@1"
    assert fresh.tags() == [("x", "prod", 1)]
    if damage != "a directory":  # detected and rebuilt on disk, not just bypassed
        assert [(r.ref, r.sha256) for r in Index(index).rows()] == expected
    assert rebuild_index(backend.reopen()) == 3  # also on the damaged file
    assert verify(fresh).ok


def test_index_damaged_while_open_falls_back(reg: Registry) -> None:
    reg.list_adapters()
    index = reg.root / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"garbage" * 1000)
    assert [r.ref for r in reg.list_adapters()] == ["x@1", "x@2", "y@1"]


def test_stale_index_rows_are_not_trusted(backend: Backend, reg: Registry) -> None:
    """A hand-edited index pointing a hash at the wrong version is checked against the card."""
    y_sha = reg.resolve("y").weights_sha256
    conn = sqlite3.connect(reg.root / "index.db")
    conn.execute("UPDATE adapters SET sha256='abcdef' || sha256 WHERE name='y'")
    conn.commit()
    conn.close()
    with pytest.raises(Exception, match="no adapter version has sha256 starting abcdef"):
        reg.resolve("sha256:abcdef")
    assert backend.reopen().resolve(f"sha256:{y_sha[:10]}").ref == "y@1"


READ_ONLY_SCRIPT = r"""
import json, sys
from pathlib import Path
from adapterhub_local.cli import main
from adapterhub_local.registry import Registry
from adapterhub_local.errors import AdapterHubError
root, out = sys.argv[1], Path(sys.argv[2])
codes = {}
for args in (["list", "--json"], ["show", "x:prod", "--json"], ["verify"], ["base", "list"],
             ["export", "x@2", str(out / "exported")]):
    codes[args[0]] = main(["--registry", root, *args])
registry = Registry.open(root)
loaded = registry.load_adapter("y", base="tiny")
codes["load"] = sorted(loaded.tensors)[0]
codes["import"] = main(["--registry", root, "import", sys.argv[3], "--name", "z", "--base", "tiny"])
codes["tag"] = main(["--registry", root, "tag", "x@2", "dev"])
print("RESULT" + json.dumps(codes))
"""


def _run_read_only(root: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the script with ``root`` mounted read-only (a private mount namespace as root; file modes
    otherwise)."""
    command = [sys.executable, "-c", READ_ONLY_SCRIPT, str(root), *args]
    env = {**os.environ, "COLUMNS": "300"}
    if os.geteuid() != 0:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
        finally:
            for path in [root, *root.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount the registry read-only")
    shell = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, str(root), *command], capture_output=True, text=True,
                          timeout=180, env=env)
    if "mount:" in proc.stderr or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount read-only here: {proc.stderr.strip()[:200]}")
    return proc


@local_only("a read-only mount is a filesystem notion (read-only bucket credentials are not modelled by the "
            "test server)")
def test_read_only_registry_lists_shows_verifies_exports_and_loads(reg: Registry, tmp_path: Path) -> None:
    source = adapter_dir(tmp_path / "new")
    for suffix in ("", "-wal", "-shm"):  # the worst case: no index file, and none can be written
        Path(f"{reg.root / 'index.db'}{suffix}").unlink(missing_ok=True)
    proc = _run_read_only(reg.root, [str(tmp_path), str(source)])
    assert "Traceback" not in proc.stderr, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    codes: dict[str, Any] = json.loads(line[len("RESULT"):])
    assert {k: codes[k] for k in ("list", "show", "verify", "base", "export")} == dict.fromkeys(
        ("list", "show", "verify", "base", "export"), 0), proc.stdout + proc.stderr
    assert codes["load"].endswith("lora_A.weight")
    assert codes["import"] != 0 and codes["tag"] != 0  # writes fail cleanly …
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("read-only" in e or "Read-only" in e for e in errors), proc.stderr
    assert (tmp_path / "exported/adapter_model.safetensors").read_bytes() == (
        reg.root / "adapters/x/2/adapter_model.safetensors").read_bytes()
    assert reg.versions_on_disk("z") == [] and not (reg.root / "index.db").exists()  # … and wrote nothing


# ------------------------------------------------------------------------------ full disk
class DiskFull:
    """Make the ``fail_at``-th write or fsync (counting both) raise ENOSPC; count them all."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.real_write, self.real_fsync = os.write, os.fsync

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, fd: int, data: Any) -> int:
        self._tick()
        return self.real_write(fd, data)

    def fsync(self, fd: int) -> None:
        self._tick()
        self.real_fsync(fd)


def _with_disk(monkeypatch: pytest.MonkeyPatch, fail_at: int | None, action: Callable[[], Any]) -> tuple[Any, int]:
    disk = DiskFull(fail_at)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk.write)
        patch.setattr(os, "fsync", disk.fsync)
        try:
            return action(), disk.calls
        except StorageError as exc:
            return exc, disk.calls


def test_full_disk_at_every_write_of_an_import_publishes_nothing(
    backend: Backend, reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = adapter_dir(tmp_path / "new")
    _, total = _with_disk(monkeypatch, None, lambda: reg.register_adapter("probe", source, "tiny"))
    assert total >= 8
    for fail_at in range(1, total + 1):
        name = f"full{fail_at}"
        result, _ = _with_disk(monkeypatch, fail_at, lambda: reg.register_adapter(name, source, "tiny"))  # noqa: B023
        if isinstance(result, StorageError):
            assert "No space left on device" in str(result) and "free disk space" in str(result)
            assert "\n" not in str(result)
            assert_nothing_published(reg, name)  # (on S3 its listing syncs: nothing in the store either)
        elif not backend.is_s3:  # locally every write precedes the commit point
            pytest.fail(f"write {fail_at} of {total} failed but the import reported success")
        else:  # the write after the store's commit (the cache's copy) failed: published, and healed by a sync
            assert [r.ref for r in reg.list_adapters(name)] == [f"{name}@1"] and not reg.check_files(result)
    assert verify(reg).ok and verify(backend.fresh()).ok


@pytest.mark.parametrize("operation", ["tag", "untag"])
def test_full_disk_in_tag_untag_is_one_clear_error(
    backend: Backend, reg: Registry, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    actions = {"tag": lambda: reg.tag("x@2", "prod"), "untag": lambda: reg.untag("x", "prod")}
    result, _ = _with_disk(monkeypatch, 1, actions[operation])
    if backend.is_s3:  # the store's tag map is the commit, before any local write: done, the cache heals
        assert not isinstance(result, StorageError), result
        changed = [("x", "prod", 2)] if operation == "tag" else []
        for client in (reg, backend.fresh()):
            client.list_adapters()  # a sync point
            assert client.tags() == changed and client.versions_on_disk("x") == [1, 2]
    else:
        assert isinstance(result, StorageError), result
        assert reg.tags() == [("x", "prod", 1)] and reg.versions_on_disk("x") == [1, 2]
    assert verify(reg).ok


@pytest.mark.parametrize("fail_at", [None, 1, 2, 3, 5, 8])
def test_a_delete_that_succeeded_never_reports_failure(
    backend: Backend, reg: Registry, monkeypatch: pytest.MonkeyPatch, fail_at: int | None
) -> None:
    """The rename (S3: the deletion marker) is the commit; a full disk afterwards (tag and cache clean-up)
    must not turn success into failure."""
    reg.tag("x@2", "dev")
    result, _ = _with_disk(monkeypatch, fail_at, lambda: reg.delete("x@2"))
    assert result == "x@2"
    for client in (reg, backend.fresh()):
        assert [r.ref for r in client.list_adapters("x")] == ["x@1"] and client.versions_on_disk("x") == [1]
        assert client.resolve("x:prod").ref == "x@1"
        assert verify(client).ok
        if fail_at is None:  # tags pointing at the deleted version go with it
            assert client.tags("x") == [("x", "prod", 1)]


POST_COMMIT: dict[str, tuple[str, Exception | NotImplementedType]] = {
    "version deleted right after publish": ("index_row", NotImplemented),
    "index locked": ("upsert", sqlite3.OperationalError("database is locked")),
    "index corrupt": ("upsert", sqlite3.DatabaseError("database disk image is malformed")),
    "disk full in the index": ("upsert", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("case", sorted(POST_COMMIT))
def test_an_import_that_published_never_reports_failure(
    backend: Backend, reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """After the rename nothing may fail the import: the index is a cache and heals itself."""
    from adapterhub_local.errors import NotFoundError
    from adapterhub_local.registry.index import Index as IndexClass

    where, error = POST_COMMIT[case]

    def boom(*args: Any, **kwargs: Any) -> None:
        raise NotFoundError("adapter version vanished") if error is NotImplemented else error

    with monkeypatch.context() as patch:  # (not monkeypatch.undo(): that would also drop the S3 environment)
        patch.setattr(Registry if where == "index_row" else IndexClass, where, boom)
        card = reg.register_adapter("late", adapter_dir(tmp_path / "late", tensors=lora_tensors(seed=7)), "tiny")
    assert card.ref == "late@1" and [r.ref for r in reg.list_adapters("late")] == ["late@1"]
    assert verify(reg).ok and backend.fresh().resolve("late").content_hash == card.content_hash
