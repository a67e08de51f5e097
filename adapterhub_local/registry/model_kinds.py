"""Baselines as registry versions of their own kinds: full fine-tunes (``full``) and head-only classifiers
(``head``), beside the adapters, with the same guarantees — immutable ``adapters/<name>/<N>/`` versions,
sha256 of every file checked on load, a card with base fingerprint, resolved recipe, dataset fingerprint,
metrics and labels, and the same references (``name``, ``name@N``, ``name:tag``, ``sha256:<prefix>``).

* ``full`` — every weight was trained (``full``, ``freeze_first_k``), so the version is a whole transformers
  model directory: ``config.json`` + ``model.safetensors`` (what ``save_pretrained`` writes, safetensors
  only), loadable by ``AutoModelFor….from_pretrained`` unchanged. Its tensors must fit the base it was
  fine-tuned from (same names and shapes, a new head aside), so the recorded lineage is real.
* ``head`` — a frozen base and a new classification head. Stored as the natural PEFT form: a PEFT
  directory whose ``modules_to_save`` holds the head, with PEFT's required LoRA part zero (B = 0), so
  ``PeftModel.from_pretrained`` and the multi-adapter engine load it like any classifier adapter, batched
  with LoRA adapters on the same base. The zero LoRA is checked here: a ``head`` never changes the backbone.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from adapterhub_local.errors import FormatError, ShapeMismatchError
from adapterhub_local.registry import atomic
from adapterhub_local.registry.admission import stage_source
from adapterhub_local.registry.bases import BaseRecord
from adapterhub_local.registry.cards import AdapterCard, CardInfo
from adapterhub_local.registry.fingerprint import tensor_shapes
from adapterhub_local.registry.formats import (
    ADAPTER_WEIGHTS,
    load_tensors,
    read_json,
    read_safetensors_header,
    refuse_pickle_dir,
)
from adapterhub_local.registry.importer import admit, make_card
from adapterhub_local.registry.names import validate_name
from adapterhub_local.registry.safefiles import copy_regular
from adapterhub_local.registry.store import MODEL_WEIGHTS, Registry

KIND_FULL = "full"
KIND_HEAD = "head"
MODEL_KINDS = (KIND_FULL, KIND_HEAD)
MODEL_CONFIG = "config.json"
FULL_FILES = (MODEL_CONFIG, MODEL_WEIGHTS)
# Parameters a classifier adds on top of its backbone (they need not exist in the base).
_HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.", "lm_head.")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_full_against_base(weights: Path, record: BaseRecord) -> None:
    """Raise unless ``weights`` are a fine-tune of ``record``: the base's tensors present with their shapes
    (names compared without the task model's backbone prefix, e.g. ``bert.``; at most a tenth of them
    dropped, as a tied LM head is), and nothing else but a classification head."""
    tuned = {name: info.shape for name, info in read_safetensors_header(weights).items()}
    base = tensor_shapes(record.path)
    firsts = {name.split(".", 1)[0] + "." for name in tuned if "." in name}
    prefixes = sorted(firsts - set(_HEAD_PREFIXES), key=len)

    def strip(name: str) -> str:
        for prefix in prefixes:
            bare = name.removeprefix(prefix)
            if bare != name and bare in base:
                return bare
        return name

    bare = {strip(name): shape for name, shape in tuned.items()}
    problems = [f"{name}: {list(shape)} here, {list(base[name])} in the base"
                for name, shape in sorted(bare.items()) if name in base and base[name] != shape]
    missing = sorted(set(base) - set(bare))
    extra = sorted(n for n in set(bare) - set(base) if not n.startswith(_HEAD_PREFIXES))
    if not set(bare) & set(base):
        problems.append("no tensor name in common with the base")
    problems += [f"{n}: not in the base" for n in extra[:5]]
    if len(missing) > len(base) // 10:
        problems.append(f"{len(missing)} of the base's {len(base)} tensors are missing (e.g. {missing[:3]})")
    if problems:
        raise ShapeMismatchError(f"{weights} is not a fine-tune of base {record.name!r}: " + "; ".join(problems[:6]),
                                 "register it against the base it was fine-tuned from")


def register_full(registry: Registry, name: str, source_dir: Path, base: str, info: CardInfo) -> AdapterCard:
    """Register a fully fine-tuned transformers model directory (``config.json`` + ``model.safetensors``) as
    a new version of kind ``full`` on ``base``."""
    validate_name(name, "model name")
    source_dir = Path(source_dir)
    record = registry.base(base)
    if not (source_dir / MODEL_WEIGHTS).is_file():
        if source_dir.is_dir():
            refuse_pickle_dir(source_dir)
        raise FormatError(f"{source_dir} has no {MODEL_WEIGHTS}",
                          "save the model with save_pretrained(..., safe_serialization=True) into one file")
    config = read_json(source_dir / MODEL_CONFIG, "model config")
    if config.get("model_type") != record.model_type:
        raise ShapeMismatchError(f"{source_dir} is a {config.get('model_type')!r} model, base {record.name!r} a "
                                 f"{record.model_type!r} one", "register it against the base it was fine-tuned from")
    check_full_against_base(source_dir / MODEL_WEIGHTS, record)
    staged = registry.new_staging()
    try:
        # One pass per file: copied as a regular file inside the run directory (no symlinks), hashed as copied.
        files = {f: copy_regular(source_dir / f, source_dir, staged / f, follow_inside=False) for f in FULL_FILES}
        card = AdapterCard(**asdict(info), name=name, kind=KIND_FULL, base=record.name,
                           base_fingerprint=record.fingerprint, files=files, created=_now())
        return registry.publish(staged, card)
    finally:
        atomic.remove_tree(staged)


def register_head(registry: Registry, name: str, source_dir: Path, base: str, info: CardInfo) -> AdapterCard:
    """Register a head-only PEFT directory (head in ``modules_to_save``, LoRA B all zero) as kind ``head``,
    through the same import gate as every adapter (:mod:`~adapterhub_local.registry.importer`)."""
    validate_name(name, "model name")
    source_dir = Path(source_dir)
    record = registry.base(base)
    staged = registry.new_staging()
    try:
        copied = stage_source(source_dir, staged)
        summary = admit(registry, staged, record, str(source_dir))
        heads = [str(m) for m in summary.config.get("modules_to_save") or []]
        if summary.kind != "lora" or not heads:
            raise FormatError(f"{source_dir} is not a head-only directory (kind {summary.kind}, "
                              f"modules_to_save {heads})",
                              "save a PEFT LoRA model whose modules_to_save is the classification head")
        tensors = load_tensors(staged / ADAPTER_WEIGHTS)
        moving = sorted(k for k, v in tensors.items() if ".lora_B." in k and bool(v.abs().max() > 0))
        if moving:
            raise FormatError(f"{source_dir} changes the backbone: LoRA B is non-zero in {moving[:3]}",
                              "register it as a LoRA adapter (Registry.register_adapter), not as a head")
        fields = CardInfo(**{**asdict(info), "task_type": info.task_type or "sequence_classification"})
        card = make_card(name, summary, record, fields, copied.files)
        card.kind = KIND_HEAD
        return registry.publish(staged, card)
    finally:
        atomic.remove_tree(staged)


def full_model_dir(registry: Registry, ref: str) -> tuple[AdapterCard, Path]:
    """The verified directory of a ``full`` version (every file's sha256 checked, base still registered with
    the recorded fingerprint)."""
    card = registry.resolve(ref)
    if card.kind != KIND_FULL:
        raise FormatError(f"{card.ref} is a {card.kind} version, not a full fine-tune",
                          "load it as an adapter onto its base")
    return registry.verified_path(card.ref, card.base)
