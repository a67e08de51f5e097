"""Registry store: PEFT round trips, integrity, fingerprints, shapes, references, tags, deletion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapterhub_local.errors import (
    AlreadyExistsError,
    FingerprintMismatchError,
    FormatError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    ShapeMismatchError,
)
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.maintenance import collect_garbage, export, rebuild_index, verify
from tests.conftest import make_tiny_llama
from tests.peft_factory import save_lora, save_prompt
from tests.registry.conftest import s3_registry


@pytest.fixture(params=["local", "s3"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    """The contract below holds on both back ends: a local directory and an S3-compatible object store."""
    if request.param == "local":
        return Registry(tmp_path / "registry")
    return s3_registry(request, tmp_path)


TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5], [2, 7, 1, 8, 28, 1]])


def test_lora_import_export_is_bit_identical(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> None:
    original = save_lora(tiny_llama_dir, tmp_path / "lora", rank=4)
    card = llama_registry.register_adapter("sent", tmp_path / "lora", "tiny", CardInfo(task="demo"))
    assert (card.ref, card.kind, card.rank, card.target_modules) == ("sent@1", "lora", 4, ["q_proj", "v_proj"])
    assert card.task_type == "causal_lm"
    out = export(llama_registry, "sent", tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    with torch.no_grad():
        assert torch.equal(original(TOKENS).logits, loaded(TOKENS).logits)
    stored = (out / "adapter_model.safetensors").read_bytes()
    assert stored == (tmp_path / "lora/adapter_model.safetensors").read_bytes()


def test_prompt_tuning_import_export_is_bit_identical(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    original = save_prompt(tiny_llama_dir, tmp_path / "prompt", n_virtual=5)
    card = llama_registry.register_adapter("soft", tmp_path / "prompt", "tiny")
    assert (card.kind, card.num_virtual_tokens, card.rank) == ("prompt", 5, None)
    out = export(llama_registry, "soft@1", tmp_path / "exported")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    with torch.no_grad():
        assert torch.equal(original(TOKENS).logits, loaded(TOKENS).logits)


def _corrupt(path: Path, offset: int = -3) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_one_changed_byte_is_detected_and_load_refused(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a", seed=1)
    save_lora(tiny_llama_dir, tmp_path / "b", seed=2)
    llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    llama_registry.register_adapter("x", tmp_path / "b", "tiny")
    _corrupt(llama_registry.root / "adapters/x/1/adapter_model.safetensors")
    report = verify(llama_registry)
    assert not report.ok
    assert report.problems == ["x@1: adapter_model.safetensors does not match its sha256 (damaged)"]
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors"):
        llama_registry.load_adapter("x@1")
    assert llama_registry.load_adapter("x@2").card.version == 2
    assert verify(llama_registry, "x@2").ok


def test_missing_or_extra_file_is_detected(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a")
    card = llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    version_dir = llama_registry.path_of(card)
    os.chmod(version_dir, 0o755)
    (version_dir / "evil.bin").write_bytes(b"not ours")
    assert any("unexpected file evil.bin" in p for p in verify(llama_registry).problems)


def test_other_base_fingerprint_is_refused_naming_both(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    llama_registry.add_base("other", str(make_tiny_llama(tmp_path / "other", seed=7)))
    save_lora(tiny_llama_dir, tmp_path / "a")
    card = llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    with pytest.raises(FingerprintMismatchError, match=r"base 'tiny'.*base 'other'"):
        llama_registry.load_adapter(card.ref, base="other")
    export(llama_registry, "x", tmp_path / "exp", with_card=True)
    with pytest.raises(FingerprintMismatchError, match=r"base 'tiny'.*base 'other'"):
        llama_registry.register_adapter("y", tmp_path / "exp", "other")


def test_shape_mismatch_is_refused(llama_registry: Registry, tmp_path: Path) -> None:
    wide = make_tiny_llama(tmp_path / "wide", hidden=64)
    save_lora(wide, tmp_path / "a")
    with pytest.raises(ShapeMismatchError, match="does not fit base 'tiny'"):
        llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    assert llama_registry.list_adapters() == []


def test_pickle_adapter_is_refused_with_conversion_hint(llama_registry: Registry, tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    (directory / "adapter_config.json").write_text("{}")
    with pytest.raises(FormatError, match=r"pickle.*save_file"):
        llama_registry.register_adapter("x", directory, "tiny")


@pytest.mark.parametrize("damage", ["header_len", "header_json", "offsets"])
def test_malformed_safetensors_gives_clear_error(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path, damage: str
) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a")
    weights = tmp_path / "a/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "header_len":
        data[0:8] = (10**12).to_bytes(8, "little")
    elif damage == "header_json":
        data[8] = ord("!")
    else:
        data = data[: len(data) - 16]
    weights.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="safetensors"):
        llama_registry.register_adapter("x", tmp_path / "a", "tiny")


def test_malformed_config_gives_clear_error(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a")
    (tmp_path / "a/adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        llama_registry.register_adapter("x", tmp_path / "a", "tiny")


def test_references_tags_and_delete(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        save_lora(tiny_llama_dir, tmp_path / f"a{seed}", seed=seed)
        llama_registry.register_adapter("x", tmp_path / f"a{seed}", "tiny")
    assert llama_registry.resolve("x").version == 3
    llama_registry.tag("x@2", "prod")
    assert llama_registry.resolve("x:prod").version == 2
    sha = llama_registry.resolve("x@1").files["adapter_model.safetensors"]
    assert llama_registry.resolve(f"sha256:{sha[:10]}").version == 1
    llama_registry.delete("x@2")
    with pytest.raises(NotFoundError, match="no tag 'prod'"):
        llama_registry.resolve("x:prod")
    assert [r.version for r in llama_registry.list_adapters("x")] == [1, 3]
    save_lora(tiny_llama_dir, tmp_path / "a4", seed=4)
    assert llama_registry.register_adapter("x", tmp_path / "a4", "tiny").version == 4  # numbers never reused
    with pytest.raises(InvalidNameError):
        llama_registry.register_adapter("../x", tmp_path / "a4", "tiny")


def test_versions_are_read_only(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a")
    card = llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    for item in llama_registry.path_of(card).iterdir():
        assert item.stat().st_mode & 0o222 == 0


def test_index_rebuild_and_self_healing(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a")
    llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    llama_registry.register_adapter("y", tmp_path / "a", "tiny")
    llama_registry.tag("y", "prod")
    before = llama_registry.list_adapters()
    (llama_registry.root / "index.db").unlink()
    for suffix in ("-wal", "-shm"):
        (llama_registry.root / f"index.db{suffix}").unlink(missing_ok=True)
    fresh = Registry(llama_registry.root)
    assert rebuild_index(fresh) == 2
    assert fresh.list_adapters() == before
    assert fresh.tags() == [("y", "prod", 1)]


def test_gc_removes_dead_writer_staging(llama_registry: Registry) -> None:
    staging = llama_registry.root / ".staging" / "999999-deadbeef"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"partial")
    report = collect_garbage(llama_registry)
    assert report.removed == [".staging/999999-deadbeef"] and not staging.exists()


def test_base_records_and_fingerprint_cache(registry: Registry, tiny_llama_dir: Path) -> None:
    record = registry.add_base("tiny", str(tiny_llama_dir))
    assert record.architecture == "LlamaForCausalLM" and record.hidden_size == 32 and len(record.fingerprint) == 64
    assert registry.base("tiny").fingerprint == record.fingerprint
    with pytest.raises(AlreadyExistsError):
        registry.add_base("tiny", str(tiny_llama_dir))
    with pytest.raises(NotFoundError, match="known: tiny"):
        registry.base("nope")
    cache = json.loads((record.path / ".fingerprint.json").read_text())
    assert cache["fingerprint"] == record.fingerprint


def test_base_without_safetensors_is_refused(registry: Registry, tmp_path: Path) -> None:
    directory = tmp_path / "pickled-base"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FormatError, match="pickle"):
        registry.add_base("p", str(directory))
    assert registry.list_bases() == []
