"""A vLLM ``LoRAResolver`` plugin: a request's ``model`` names a registry version (``name``, ``name@3``,
``name:prod``, ``sha256:<prefix>``); the resolver verifies the version's files against their sha256,
checks it against vLLM's limits, exports it once into a cache directory keyed by its content hash and
returns the ``LoRARequest`` vLLM loads.

The interface, as read in vLLM's source (``vllm/lora/resolver.py``; the built-in resolvers in
``vllm/plugins/lora_resolvers/``): a resolver implements ``async resolve_lora(base_model_name,
lora_name) -> LoRARequest | None`` and is registered with ``LoRAResolverRegistry.register_resolver(name,
resolver)`` by a function that vLLM calls for each entry point in the ``vllm.general_plugins`` group
(``vllm/plugins/__init__.py``). vLLM asks resolvers only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is
true, and loads only the plugins named in ``VLLM_PLUGINS`` when that is set. This package declares the
entry point ``adapterhub_lora_resolver`` → :func:`register`, configured by the environment:

- ``ADAPTERHUB_HOME``: the registry (default ``./registry``);
- ``ADAPTERHUB_VLLM_CACHE``: where exports are kept (default ``~/.cache/adapterhub/vllm``);
- ``ADAPTERHUB_VLLM_BASES``: ``served=base,…`` — which registered base a vLLM model name is (a base also
  matches its own name and the source it was registered from).

``lora_int_id`` is derived from the content hash, so it is the same in every vLLM process and a different
version never reuses another's id. vLLM remembers a name once resolved: give it immutable references
(``name@N`` or ``sha256:…``) — a moving one (``name``, ``name:tag``) is resolved once per vLLM process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from adapterhub_local.errors import AdapterHubError, InvalidNameError, InvalidReferenceError, NotFoundError
from adapterhub_local.export.vllm_export import EXPORT_RECORD, check_version, refuse, write_vllm_dir
from adapterhub_local.registry.atomic import sha256_file
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.formats import ADAPTER_WEIGHTS
from adapterhub_local.registry.names import parse_reference
from adapterhub_local.registry.store import Registry, default_root

log = logging.getLogger(__name__)
RESOLVER_NAME = "adapterhub"
CACHE_ENV = "ADAPTERHUB_VLLM_CACHE"
BASES_ENV = "ADAPTERHUB_VLLM_BASES"
R = TypeVar("R")


def lora_int_id(content_hash: str) -> int:
    """A positive id for vLLM, the same in every process for the same bytes (60 bits of the hash)."""
    return int(content_hash[:15], 16) + 1


def parse_bases(text: str | None) -> dict[str, str]:
    """``served=base,served2=base2`` → mapping (blank entries ignored)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if item.strip():
            served, sep, base = item.partition("=")
            if not sep or not served.strip() or not base.strip():
                raise InvalidReferenceError(f"{BASES_ENV} entry {item!r} is not served=base",
                                            f"write {BASES_ENV} as served-model-name=registered-base,…")
            out[served.strip()] = base.strip()
    return out


class AdapterHubLoRAResolver(Generic[R]):
    """Resolves vLLM ``model`` names against a registry. ``request_type`` builds the returned request (vLLM's
    ``LoRARequest`` in production; called with ``lora_name``, ``lora_int_id`` and ``lora_path``)."""

    def __init__(self, registry: Registry, cache_dir: Path, request_type: Callable[..., R],
                 bases: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        self.request_type = request_type
        self.bases = dict(bases or {})

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> R | None:
        """vLLM's entry: None when ``lora_name`` is not a version of this registry for that base (so
        another resolver may answer); a project error when the version is damaged or vLLM cannot serve it."""
        return await asyncio.to_thread(self.resolve, base_model_name, lora_name)

    def resolve(self, base_model_name: str, lora_name: str) -> R | None:
        try:
            parse_reference(lora_name)
            card = self.registry.resolve(lora_name)
        except (InvalidReferenceError, InvalidNameError, NotFoundError):
            return None
        if not self._serves(base_model_name, card):
            log.info("%s is an adapter of base %r, not of the served model %r", card.ref, card.base, base_model_name)
            return None
        path = self.materialize(card, base_model_name)
        return self.request_type(lora_name=lora_name, lora_int_id=lora_int_id(card.content_hash),
                                 lora_path=str(path))

    def _serves(self, base_model_name: str, card: AdapterCard) -> bool:
        if self.bases.get(base_model_name) == card.base or base_model_name == card.base:
            return True
        try:
            record = self.registry.base(card.base)
        except AdapterHubError:
            return False
        return base_model_name in (record.source, str(record.path))

    def cache_path(self, card: AdapterCard, base_model_name: str) -> Path:
        """``<cache>/<content hash>-<served-name hash>``: new bytes never share a directory with old ones."""
        served = hashlib.sha256(base_model_name.encode()).hexdigest()[:8]
        return self.cache_dir / f"{card.content_hash}-{served}"

    def materialize(self, card: AdapterCard, base_model_name: str) -> Path:
        """The verified export of ``card`` in the cache (written once; checked again on every hit)."""
        card, source, check = check_version(self.registry, card.ref)  # sha256 of every stored file
        if not check.ok:
            raise refuse(card, check)
        target = self.cache_path(card, base_model_name)
        if self._intact(target, card):
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = self.cache_dir / f".{target.name}.{os.getpid()}.{id(self)}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            write_vllm_dir(card, source, staging, check, base_model_name)
            if target.exists():  # damaged (not intact above): never served, replaced
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:
                if not self._intact(target, card):  # another process won the race with the same bytes
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @staticmethod
    def _intact(target: Path, card: AdapterCard) -> bool:
        try:
            record = json.loads((target / EXPORT_RECORD).read_text())
            return bool(record.get("content_hash") == card.content_hash
                        and sha256_file(target / ADAPTER_WEIGHTS) == card.files[ADAPTER_WEIGHTS])
        except (OSError, ValueError, KeyError, AttributeError):
            return False


def from_environment(request_type: Callable[..., R], env: Mapping[str, str] | None = None) -> AdapterHubLoRAResolver[R]:
    """A resolver configured as :func:`register` configures it (``env`` defaults to ``os.environ``)."""
    env = os.environ if env is None else env
    root = Path(env["ADAPTERHUB_HOME"]) if env.get("ADAPTERHUB_HOME") else default_root()
    cache = Path(env.get(CACHE_ENV) or Path.home() / ".cache" / "adapterhub" / "vllm")
    return AdapterHubLoRAResolver(Registry.open(root), cache, request_type, parse_bases(env.get(BASES_ENV)))


def register() -> None:
    """vLLM general-plugin entry point: register the resolver under the name ``adapterhub``."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class VllmResolver(AdapterHubLoRAResolver[Any], LoRAResolver):
        """The resolver as a ``LoRAResolver`` subclass (vLLM's registry expects one)."""

    base = from_environment(LoRARequest)
    resolver = VllmResolver(base.registry, base.cache_dir, LoRARequest, base.bases)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)

