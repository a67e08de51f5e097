"""The vLLM LoRA resolver plugin, against vLLM's interface as read in its source: ``async resolve_lora(
base_model_name, lora_name) -> LoRARequest | None``. vLLM itself is not installable here (no GPU build), so
:class:`FakeLoRARequest` stands in for vLLM's request type only; the test with the real classes runs where
vLLM is importable."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapterhub_local.errors import IntegrityError
from adapterhub_local.export.vllm_resolver import AdapterHubLoRAResolver, from_environment, lora_int_id
from adapterhub_local.registry import Registry
from tests.peft_factory import save_lora


@dataclass(frozen=True)
class FakeLoRARequest:
    """The fields of ``vllm.lora.request.LoRARequest`` the resolver fills in (the type only)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@pytest.fixture
def two_versions(llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path) -> Registry:
    save_lora(tiny_llama_dir, tmp_path / "l1", seed=1)
    save_lora(tiny_llama_dir, tmp_path / "l2", seed=2)
    llama_registry.register_adapter("qa", tmp_path / "l1", "tiny")
    llama_registry.register_adapter("qa", tmp_path / "l2", "tiny")
    llama_registry.tag("qa@1", "prod")
    return llama_registry


def resolver(registry: Registry, tmp_path: Path) -> AdapterHubLoRAResolver[FakeLoRARequest]:
    return AdapterHubLoRAResolver(registry, tmp_path / "cache", FakeLoRARequest, {"org/tiny": "tiny"})


def test_resolves_a_version_to_a_verified_export_with_a_content_derived_id(two_versions: Registry,
                                                                           tmp_path: Path) -> None:
    res = resolver(two_versions, tmp_path)
    request = asyncio.run(res.resolve_lora("org/tiny", "qa@1"))
    assert request is not None and request.lora_name == "qa@1"
    card, stored = two_versions.verified_path("qa@1")
    assert request.lora_int_id == lora_int_id(card.content_hash) > 0
    path = Path(request.lora_path)
    assert (path / "adapter_model.safetensors").read_bytes() == (stored / "adapter_model.safetensors").read_bytes()
    again = asyncio.run(res.resolve_lora("org/tiny", "qa@1"))
    assert again == request  # a cache hit: the same directory and id, in this and in any other process
    other = asyncio.run(res.resolve_lora("org/tiny", "qa@2"))
    assert other is not None and other.lora_int_id != request.lora_int_id and other.lora_path != request.lora_path


def test_names_it_does_not_hold_or_other_bases_are_left_to_other_resolvers(two_versions: Registry,
                                                                          tmp_path: Path) -> None:
    res = resolver(two_versions, tmp_path)
    assert res.resolve("org/tiny", "nope") is None
    assert res.resolve("org/tiny", "qa@9") is None
    assert res.resolve("org/tiny", "not a ref!") is None
    assert res.resolve("org/other-model", "qa@1") is None
    assert res.resolve("tiny", "qa@1") is not None  # the registered base's own name matches too


def test_a_moved_tag_resolves_to_the_new_bytes_never_the_cached_old_ones(two_versions: Registry,
                                                                       tmp_path: Path) -> None:
    res = resolver(two_versions, tmp_path)
    first = res.resolve("org/tiny", "qa:prod")
    two_versions.tag("qa@2", "prod")
    second = res.resolve("org/tiny", "qa:prod")
    assert first is not None and second is not None
    assert second.lora_int_id == lora_int_id(two_versions.resolve("qa@2").content_hash) != first.lora_int_id
    stored = two_versions.verified_path("qa@2")[1] / "adapter_model.safetensors"
    assert (Path(second.lora_path) / "adapter_model.safetensors").read_bytes() == stored.read_bytes()


def test_a_damaged_stored_version_is_refused(two_versions: Registry, tmp_path: Path) -> None:
    weights = two_versions.verified_path("qa@1")[1] / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        resolver(two_versions, tmp_path).resolve("org/tiny", "qa@1")


def test_a_damaged_cache_entry_is_rewritten_not_served(two_versions: Registry, tmp_path: Path) -> None:
    res = resolver(two_versions, tmp_path)
    request = res.resolve("org/tiny", "qa@1")
    assert request is not None
    cached = Path(request.lora_path) / "adapter_model.safetensors"
    good = cached.read_bytes()
    cached.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert res.resolve("org/tiny", "qa@1") == request
    assert cached.read_bytes() == good


def test_configured_from_the_environment(two_versions: Registry, tmp_path: Path) -> None:
    env = {"ADAPTERHUB_HOME": str(two_versions.root), "ADAPTERHUB_VLLM_CACHE": str(tmp_path / "c"),
           "ADAPTERHUB_VLLM_BASES": "meta/served=tiny"}
    request = from_environment(FakeLoRARequest, env).resolve("meta/served", "qa@2")
    assert request is not None and Path(request.lora_path).parent == tmp_path / "c"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed here (it needs a GPU build); the resolver is tested against a "
                           "stand-in of its LoRARequest type above")
def test_registers_with_real_vllm(two_versions: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolverRegistry

    from adapterhub_local.export.vllm_resolver import RESOLVER_NAME, register

    monkeypatch.setenv("ADAPTERHUB_HOME", str(two_versions.root))
    monkeypatch.setenv("ADAPTERHUB_VLLM_CACHE", str(tmp_path / "cache"))
    register()
    request = asyncio.run(LoRAResolverRegistry.get_resolver(RESOLVER_NAME).resolve_lora("tiny", "qa@1"))
    assert isinstance(request, LoRARequest) and Path(request.lora_path).is_dir()
