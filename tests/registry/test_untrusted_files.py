"""Everything stored is untrusted input (issue 10 items 8 and 10; issue 16: on both back ends): tampered tag
maps, cards, base records, adapter configs and version counters give one clear error naming what was
stored and the fix; version numbers are never reused; the content hash identifies bytes. On S3 the
tampering goes through the bucket (an attacker with bucket access), and is read by a client whose cache
never saw it; a tampered object is never served from a cache (keyed by content hash). Symlinks planted
in the registry are never followed, listed or deleted through (a filesystem notion: local only)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from adapterhub_local.errors import FormatError, IntegrityError, NotFoundError
from adapterhub_local.registry import Registry
from adapterhub_local.registry.maintenance import collect_garbage, rebuild_index, verify
from tests.conftest import make_tiny_llama
from tests.registry.attack_kit import adapter_dir, lora_config
from tests.registry.backends import Backend, local_only

NO_LINKS = "symlinks are a filesystem notion: an object store has no links to plant"


@pytest.fixture
def reg(backend: Backend, tmp_path: Path, tiny_llama_dir: Path) -> Registry:
    """The backend's first client, holding base ``tiny`` and adapter ``x@1``."""
    backend.registry.add_base("tiny", str(tiny_llama_dir))
    backend.registry.register_adapter("x", adapter_dir(tmp_path / "a"), "tiny")
    return backend.registry


def _named(pattern: str, problems: list[str]) -> bool:
    return any(re.search(pattern, p) for p in problems)


# ---------------------------------------------------------------------------- tags.json
TAGS = {"not JSON": "{", "a list": "[1]", "version as string": '{"prod": "1"}', "negative version": '{"prod": -1}',
        "boolean version": '{"prod": true}', "traversal tag": '{"../x": 1}', "duplicate tag": '{"a": 1, "a": 1}'}


@pytest.mark.parametrize("attack", sorted(TAGS))
def test_tampered_tags_file_is_named_with_the_fix(backend: Backend, reg: Registry, attack: str) -> None:
    reg.tag("x@1", "prod")
    backend.write_tags("x", TAGS[attack])
    reg.list_adapters()  # a sync point: the first client's cached (good) map must not be served instead
    for client in (reg, backend.fresh()):
        for action in (lambda: client.resolve("x:prod"), lambda: client.tag("x@1", "dev"),  # noqa: B023
                       lambda: client.tags()):  # noqa: B023
            with pytest.raises(FormatError, match=rf"{backend.tags_file('x')}.*re-tag"):
                action()
        assert _named(backend.tags_file("x"), verify(client).problems)
        assert client.resolve("x@1").version == 1  # the version itself still resolves


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
    backend: Backend, reg: Registry, tmp_path: Path, attack: str
) -> None:
    card = backend.card_data("x", 1)
    card.update(CARDS[attack])
    backend.write_card("x", 1, json.dumps(card))
    decoy = tmp_path / "tmp"
    decoy.mkdir(exist_ok=True)
    (decoy / "keep").write_text("mine")
    reader = backend.fresh()
    where = backend.card_file("x", 1)
    with pytest.raises(FormatError, match=rf"{where}.*(restore|delete)"):
        reader.resolve("x@1")
    with pytest.raises(FormatError, match=where):
        reader.load_adapter("x")
    assert _named(where, verify(reader).problems)
    assert reader.delete("x@1") == "x@1"  # a damaged version can still be deleted
    assert (decoy / "keep").read_text() == "mine"
    assert reader.list_adapters() == [] and verify(reader).ok


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"name": "x", "name": "y"}'])
def test_card_that_is_not_one_json_object_is_refused(backend: Backend, reg: Registry, text: str) -> None:
    backend.write_card("x", 1, text)
    with pytest.raises(FormatError, match=backend.card_file("x", 1)):
        backend.fresh().resolve("x")


def test_modified_adapter_config_fails_verify(backend: Backend, reg: Registry) -> None:
    backend.replace_file(reg.resolve("x@1"), "adapter_config.json", json.dumps(lora_config(lora_alpha=9)).encode())
    reader = backend.fresh()
    [problem] = verify(reader).problems
    assert problem.startswith("x@1: ") and "adapter_config.json" in problem
    assert "does not match its sha256 (damaged)" in problem
    with pytest.raises(IntegrityError, match=r"adapter_config\.json"):
        reader.load_adapter("x")


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_a_tampered_object_is_never_served_from_a_cache(backend: Backend, reg: Registry) -> None:
    """The blob cache is keyed by content hash: a client that cached an object before it was tampered with
    keeps serving the bytes its hash names; a client without it downloads, checks and refuses."""
    from adapterhub_local.registry.objectstore import ObjectStoreRegistry

    card = reg.resolve("x@1")
    weights = "adapter_model.safetensors"
    digest = card.files[weights]
    genuine = (reg.path_of(card) / weights).read_bytes()
    tampered = genuine[:-1] + bytes([genuine[-1] ^ 1])
    backend.replace_file(card, weights, tampered)
    assert isinstance(reg, ObjectStoreRegistry)
    reg.list_adapters()  # a sync point
    blob = reg.fetch_object(digest)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest and blob.read_bytes() == genuine
    assert (reg.load_adapter("x@1").path / weights).read_bytes() == genuine
    reader = backend.fresh()
    assert isinstance(reader, ObjectStoreRegistry)
    for action in (lambda: reader.load_adapter("x@1"), lambda: reader.fetch_object(digest)):
        with pytest.raises(IntegrityError, match=rf"{digest[:12]}.*sha256"):
            action()
    assert not any(p.read_bytes() == tampered for p in reader.blobs.iterdir())  # nothing of it was cached


# ---------------------------------------------------------------------------- base.json
BASES: dict[str, Any] = {
    "fingerprint not hex": {"fingerprint": "abc"}, "name of another base": {"name": "other"},
    "hidden size as string": {"hidden_size": "32"}, "unknown field": {"evil": True},
    "unknown source kind": {"source_kind": "ftp"}, "missing field": {"architecture": None},
}


@pytest.mark.parametrize("attack", sorted(BASES))
def test_tampered_base_record_is_named_with_the_fix(backend: Backend, reg: Registry, attack: str) -> None:
    data = backend.base_record("tiny")
    data.update(BASES[attack])
    if data.get("architecture") is None:
        del data["architecture"]
    backend.write_base_record("tiny", json.dumps(data))
    reader = backend.fresh()
    with pytest.raises(FormatError, match=rf"{backend.base_file('tiny')}.*base add"):
        reader.base("tiny")
    with pytest.raises(FormatError, match=backend.base_file("tiny")):
        reader.load_adapter("x", base="tiny")
    assert _named(backend.base_file("tiny"), verify(reader).problems)


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


@local_only(NO_LINKS)
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


@local_only(NO_LINKS)
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


@local_only(NO_LINKS)
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


@local_only(NO_LINKS)
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
def test_version_numbers_are_never_reused(backend: Backend, reg: Registry, tmp_path: Path) -> None:
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
    fresh = backend.fresh()  # S3: a client with none of the first one's local state
    assert rebuild_index(fresh) == 1
    fresh.delete("x@4")
    assert fresh.register_adapter("x", source, "tiny").version == 5
    backend.raise_counter("x", 9)  # a number recorded as used by hand is never handed out either
    assert fresh.register_adapter("x", source, "tiny").version == 10


COUNTERS = {  # attack → (local high-water mark text, S3 key among the name's manifests)
    "empty": ("", ".json"), "letters": ("abc", "abc.json"), "negative": ("-3", "-3.json"), "zero": ("0", "0.json"),
    "fraction": ("1.5", "1.5.json"), "NUL or leading zero": ("\x00", "01.json"), "no suffix": ("1 2", "7"),
}


@pytest.mark.parametrize("attack", sorted(COUNTERS))
def test_damaged_version_counter_is_named_with_the_fix(backend: Backend, reg: Registry, tmp_path: Path,
                                                        attack: str) -> None:
    backend.damage_counter("x", *COUNTERS[attack])
    with pytest.raises(FormatError, match=rf"{backend.counter_file('x')}.*highest version number"):
        reg.register_adapter("x", adapter_dir(tmp_path / "b"), "tiny")
    assert _named(backend.counter_file("x"), verify(reg).problems)
    assert [r.ref for r in backend.fresh().list_adapters()] == ["x@1"]  # nothing was published


def test_content_hash_identifies_bytes_not_names(backend: Backend, reg: Registry, tmp_path: Path) -> None:
    a = reg.register_adapter("y", adapter_dir(tmp_path / "a"), "tiny")
    same = reg.register_adapter("z", adapter_dir(tmp_path / "a"), "tiny")
    other_alpha = reg.register_adapter("y", adapter_dir(tmp_path / "c", config=lora_config(lora_alpha=16)), "tiny")
    assert a.content_hash == same.content_hash == reg.resolve("x@1").content_hash
    assert other_alpha.content_hash != a.content_hash  # same weights, other scale: another adapter
    assert other_alpha.weights_sha256 == a.weights_sha256 and len(a.content_hash) == 64
    assert backend.fresh().resolve("z@1").content_hash == a.content_hash  # another client computes the same


def test_another_base_with_the_same_name_is_refused(reg: Registry, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "other", seed=9)
    with pytest.raises(Exception, match="already registered"):
        reg.add_base("tiny", str(tmp_path / "other"))
