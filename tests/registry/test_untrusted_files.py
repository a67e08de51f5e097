"""Every file on disk is untrusted input (issue 10 items 8 and 10): tampered ``tags.json``, ``card.json``,
``base.json`` and high-water marks give one clear error naming the file and the fix; symlinks planted in
the registry are never followed, listed or deleted through; version numbers are never reused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from adapterhub_local.errors import FormatError, IntegrityError, NotFoundError
from adapterhub_local.registry import Registry
from adapterhub_local.registry.maintenance import collect_garbage, rebuild_index, verify
from tests.conftest import make_tiny_llama
from tests.registry.attack_kit import adapter_dir, lora_config


@pytest.fixture
def reg(tmp_path: Path, tiny_llama_dir: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.add_base("tiny", str(tiny_llama_dir))
    registry.register_adapter("x", adapter_dir(tmp_path / "a"), "tiny")
    return registry


def _writable(path: Path) -> Path:
    os.chmod(path.parent, 0o755)
    if path.exists():
        os.chmod(path, 0o644)
    return path


# ---------------------------------------------------------------------------- tags.json
TAGS = {"not JSON": "{", "a list": "[1]", "version as string": '{"prod": "1"}', "negative version": '{"prod": -1}',
        "boolean version": '{"prod": true}', "traversal tag": '{"../x": 1}', "duplicate tag": '{"a": 1, "a": 1}'}


@pytest.mark.parametrize("attack", sorted(TAGS))
def test_tampered_tags_file_is_named_with_the_fix(reg: Registry, attack: str) -> None:
    reg.tag("x@1", "prod")
    _writable(reg.root / "adapters/x/tags.json").write_text(TAGS[attack])
    for action in (lambda: reg.resolve("x:prod"), lambda: reg.tag("x@1", "dev"), lambda: reg.tags()):
        with pytest.raises(FormatError, match=r"adapters/x/tags\.json.*re-tag"):
            action()
    assert any("tags.json" in p for p in verify(reg).problems)
    assert reg.resolve("x@1").version == 1  # the version itself still resolves


# ---------------------------------------------------------------------------- card.json
CARDS: dict[str, Any] = {
    "name pointing outside": {"name": "../../../tmp"},
    "another version's card": {"version": 7},
    "file path outside": {"files": {"../../../../etc/passwd": "0" * 64}},
    "absolute file path": {"files": {"/etc/passwd": "0" * 64}},
    "hash not hex": {"files": {"adapter_model.safetensors": "zz"}},
    "rank as string": {"rank": "4"},
    "base pointing outside": {"base": "../../bases/x"},
    "unknown field": {"evil": 1},
    "alpha NaN": {"alpha": float("nan")},
}


@pytest.mark.parametrize("attack", sorted(CARDS))
def test_tampered_card_is_named_with_the_fix_and_nothing_outside_is_touched(
    reg: Registry, tmp_path: Path, attack: str
) -> None:
    path = _writable(reg.root / "adapters/x/1/card.json")
    card = json.loads(path.read_text())
    card.update(CARDS[attack])
    path.write_text(json.dumps(card))
    decoy = tmp_path / "tmp"
    decoy.mkdir(exist_ok=True)
    (decoy / "keep").write_text("mine")
    with pytest.raises(FormatError, match=r"adapters/x/1/card\.json.*(restore|delete)"):
        reg.resolve("x@1")
    with pytest.raises(FormatError, match=r"card\.json"):
        reg.load_adapter("x")
    assert any("card.json" in p for p in verify(reg).problems)
    assert reg.delete("x@1") == "x@1"  # a damaged version can still be deleted
    assert (decoy / "keep").read_text() == "mine"


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"name": "x", "name": "y"}'])
def test_card_that_is_not_one_json_object_is_refused(reg: Registry, text: str) -> None:
    _writable(reg.root / "adapters/x/1/card.json").write_text(text)
    with pytest.raises(FormatError, match=r"card\.json"):
        reg.resolve("x")


def test_modified_adapter_config_fails_verify(reg: Registry) -> None:
    _writable(reg.root / "adapters/x/1/adapter_config.json").write_text(json.dumps(lora_config(lora_alpha=9)))
    assert verify(reg).problems == ["x@1: adapter_config.json does not match its sha256 (damaged)"]
    with pytest.raises(IntegrityError, match=r"adapter_config\.json"):
        reg.load_adapter("x")


# ---------------------------------------------------------------------------- base.json
BASES: dict[str, Any] = {
    "fingerprint not hex": {"fingerprint": "abc"}, "name of another base": {"name": "other"},
    "hidden size as string": {"hidden_size": "32"}, "unknown field": {"evil": True},
    "unknown source kind": {"source_kind": "ftp"}, "missing field": {"architecture": None},
}


@pytest.mark.parametrize("attack", sorted(BASES))
def test_tampered_base_record_is_named_with_the_fix(reg: Registry, attack: str) -> None:
    path = _writable(reg.root / "bases/tiny/base.json")
    data = json.loads(path.read_text())
    data.update(BASES[attack])
    if data.get("architecture") is None:
        del data["architecture"]
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"bases/tiny/base\.json.*base add"):
        reg.base("tiny")
    assert any("base.json" in p for p in verify(reg).problems)


# ------------------------------------------------------------------ symlinks in the registry
def _outside_version(tmp_path: Path, reg: Registry) -> Path:
    """A copy of a real version directory outside the registry (what a planted link points at)."""
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    for item in (reg.root / "adapters/x/1").iterdir():
        (outside / "1" / item.name).write_bytes(item.read_bytes())
    return outside


PLANTS = {
    "adapter name dir": lambda reg, out: os.symlink(out, reg.root / "adapters/evil"),
    "version dir": lambda reg, out: os.symlink(out / "1", reg.root / "adapters/x/2"),
    "base dir": lambda reg, out: os.symlink(reg.root / "bases/tiny", reg.root / "bases/evil"),
}


@pytest.mark.parametrize("attack", sorted(PLANTS))
def test_planted_symlinks_are_never_followed_listed_or_deleted_through(
    reg: Registry, tmp_path: Path, attack: str
) -> None:
    outside = _outside_version(tmp_path, reg)
    PLANTS[attack](reg, outside)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    assert [r.ref for r in reg.list_adapters()] == ["x@1"]
    assert [b.name for b in reg.list_bases()] == ["tiny"]
    for ref in ("evil", "evil@1", "x@2"):
        with pytest.raises(NotFoundError):
            reg.delete(ref)
    assert any("symlink" in p for p in verify(reg).problems)
    collect_garbage(reg)
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before


def test_symlinked_file_inside_a_version_is_refused(reg: Registry, tmp_path: Path) -> None:
    directory = reg.root / "adapters/x/1"
    outside = tmp_path / "weights"
    outside.write_bytes((directory / "adapter_model.safetensors").read_bytes())
    os.chmod(directory, 0o755)
    (directory / "adapter_model.safetensors").unlink()
    os.symlink(outside, directory / "adapter_model.safetensors")
    assert any("symlink" in p for p in verify(reg).problems)
    with pytest.raises(IntegrityError, match="symlink"):
        reg.load_adapter("x")


@pytest.mark.parametrize("fname", ["model.safetensors", "config.json", "base.json"])
def test_symlinked_file_inside_a_base_is_refused(reg: Registry, tmp_path: Path, fname: str) -> None:
    directory = reg.root / "bases/tiny"
    outside = tmp_path / "elsewhere"
    outside.write_bytes((directory / fname).read_bytes())
    os.chmod(directory, 0o755)
    (directory / fname).unlink()
    os.symlink(outside, directory / fname)
    with pytest.raises(FormatError, match=f"bases/tiny/{fname} is a symlink"):
        reg.load_adapter("x", base="tiny")
    assert any("is a symlink" in p for p in verify(reg).problems)


def test_gc_unlinks_a_planted_staging_symlink_without_following_it(reg: Registry, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("precious")
    (reg.root / ".staging").mkdir(exist_ok=True)
    os.symlink(victim, reg.root / ".staging/999999-planted")
    collect_garbage(reg)
    assert not (reg.root / ".staging/999999-planted").is_symlink()
    assert (victim / "data").read_text() == "precious"


# ------------------------------------------------------------------ version numbers never reused
def test_version_numbers_are_never_reused(reg: Registry, tmp_path: Path) -> None:
    source = adapter_dir(tmp_path / "b")
    assert reg.register_adapter("x", source, "tiny").version == 2
    reg.delete("x@2")
    assert reg.register_adapter("x", source, "tiny").version == 3  # the latest was deleted: still a new number
    reg.delete("x@1")
    reg.delete("x@3")
    assert not (reg.root / "adapters/x").exists()  # the name directory is gone …
    assert reg.register_adapter("x", source, "tiny").version == 4  # … and the number still moves on
    for suffix in ("", "-wal", "-shm"):
        (reg.root / f"index.db{suffix}").unlink(missing_ok=True)
    fresh = Registry(reg.root)
    assert rebuild_index(fresh) == 1
    fresh.delete("x@4")
    assert fresh.register_adapter("x", source, "tiny").version == 5


@pytest.mark.parametrize("text", ["", "abc", "-3", "0", "1.5", "\x00"])
def test_damaged_high_water_mark_is_named_with_the_fix(reg: Registry, tmp_path: Path, text: str) -> None:
    (reg.root / ".versions/x").write_text(text)
    with pytest.raises(FormatError, match=r"\.versions/x.*highest version number"):
        reg.register_adapter("x", adapter_dir(tmp_path / "b"), "tiny")
    assert any(".versions/x" in p for p in verify(reg).problems)


def test_content_hash_identifies_bytes_not_names(reg: Registry, tmp_path: Path) -> None:
    a = reg.register_adapter("y", adapter_dir(tmp_path / "a"), "tiny")
    same = reg.register_adapter("z", adapter_dir(tmp_path / "a"), "tiny")
    other_alpha = reg.register_adapter("y", adapter_dir(tmp_path / "c", config=lora_config(lora_alpha=16)), "tiny")
    assert a.content_hash == same.content_hash == reg.resolve("x@1").content_hash
    assert other_alpha.content_hash != a.content_hash  # same weights, other scale: another adapter
    assert other_alpha.weights_sha256 == a.weights_sha256 and len(a.content_hash) == 64


def test_another_base_with_the_same_name_is_refused(reg: Registry, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "other", seed=9)
    with pytest.raises(Exception, match="already registered"):
        reg.add_base("tiny", str(tmp_path / "other"))
