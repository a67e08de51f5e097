"""``adapterhub export REF DIR --target vllm``: a verified version written as the PEFT LoRA directory
vLLM's loader reads, after :func:`~adapterhub_local.export.vllm_limits.check_vllm` found nothing vLLM
would refuse or serve differently.

The weights file is copied byte for byte (vLLM reads PEFT's own tensor names). ``adapter_config.json`` is
the stored one, with ``base_model_name_or_path`` set to the name vLLM serves the base under when one is
given (vLLM's resolvers match adapters to the served model by that field). Beside them,
``adapterhub_export.json`` records the source version, its content hash, the ``--max-lora-rank`` to start
vLLM with, and what the hand-off does not carry (the card's prompt template and stop strings: vLLM
sees the raw prompt, so a client must send it formatted). The directory is written in a staging sibling
and renamed into place whole, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_local.errors import AlreadyExistsError, UnsupportedError
from adapterhub_local.export.vllm_limits import VllmCheck, check_vllm
from adapterhub_local.registry import atomic
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json, read_safetensors_header
from adapterhub_local.registry.safefiles import copy_regular, storage_error
from adapterhub_local.registry.store import Registry
from adapterhub_local.task_spec import SPEC_KEY

EXPORT_RECORD = "adapterhub_export.json"


@dataclass
class VllmExport:
    """What was written, and what vLLM must be told."""

    ref: str
    content_hash: str
    path: Path
    max_lora_rank: int
    notes: list[str] = field(default_factory=list)


def check_version(registry: Registry, ref: str) -> tuple[AdapterCard, Path, VllmCheck]:
    """Resolve and verify ``ref`` (every file against its sha256), then check it against vLLM's limits."""
    card, source = registry.verified_path(ref)
    base = registry.base(card.base)
    if card.kind in ("prompt", "full"):
        return card, source, check_vllm(card.kind, {}, [], base.architecture)
    config = read_json(source / ADAPTER_CONFIG, "adapter config")
    names = sorted(read_safetensors_header(source / ADAPTER_WEIGHTS))
    check = check_vllm(card.kind, config, names, base.architecture)
    if card.extra.get(SPEC_KEY):
        check.notes.append("not carried: the card's task template and stop strings — vLLM sees the raw prompt, so "
                           "send it formatted as `adapterhub show` describes (the card is kept in "
                           f"{EXPORT_RECORD})")
    return card, source, check


def refuse(card: AdapterCard, check: VllmCheck) -> UnsupportedError:
    """One error naming every reason (one per line in the message, ``;``-joined) and the way out."""
    return UnsupportedError(f"{card.ref} cannot be handed to vLLM without changing what it computes: "
                            + "; ".join(check.refusals),
                            "fix the adapter as each reason says, or serve it with `adapterhub serve`")


def export_vllm(registry: Registry, ref: str, target: Path, served_base: str | None = None) -> VllmExport:
    """Check ``ref`` against vLLM's limits and write it to ``target`` (a new or empty directory)."""
    card, source, check = check_version(registry, ref)
    if not check.ok:
        raise refuse(card, check)
    assert check.max_lora_rank is not None
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExistsError(f"export target {target} is not an empty directory", "choose a new or empty directory")
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True)
        write_vllm_dir(card, source, staging, check, served_base)
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()  # an empty directory given as the target is replaced by the finished one
        os.rename(staging, target)
    except OSError as exc:
        raise storage_error(exc, target, "write the export to") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return VllmExport(ref=card.ref, content_hash=card.content_hash, path=target,
                      max_lora_rank=check.max_lora_rank, notes=check.notes)


def write_vllm_dir(card: AdapterCard, source: Path, target: Path, check: VllmCheck, served_base: str | None) -> None:
    """Write the vLLM directory's files into ``target`` (which exists and is empty)."""
    copy_regular(source / ADAPTER_WEIGHTS, source, target / ADAPTER_WEIGHTS, follow_inside=False)
    config = read_json(source / ADAPTER_CONFIG, "adapter config")
    if served_base is not None:
        config["base_model_name_or_path"] = served_base
    atomic.write_text_atomic(target / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))
    record = {"source": card.ref, "content_hash": card.content_hash, "files": card.files,
              "max_lora_rank": check.max_lora_rank, "notes": check.notes, "card": json.loads(card.to_json())}
    atomic.write_text_atomic(target / EXPORT_RECORD, json.dumps(record, indent=2, sort_keys=True))
