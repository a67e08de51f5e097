"""Importing a PEFT adapter directory as a new version: stage a private copy, admit it through the
import gate, carry over what a foreign ``card.json`` (from ``export --with-card`` or ``pull``) knows
— task, metrics, lineage — and publish.

Every check runs on the staged copy, so what was checked is exactly what is published. An import that
raises has published nothing.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_local.errors import FingerprintMismatchError
from adapterhub_local.registry import atomic
from adapterhub_local.registry.admission import base_fit, fitting_bases, inspect_version, stage_source
from adapterhub_local.registry.bases import BaseRecord
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard, CardInfo, merge_info
from adapterhub_local.registry.names import validate_name
from adapterhub_local.registry.peft_dir import AdapterSummary, raise_problems
from adapterhub_local.registry.safefiles import storage_error

if TYPE_CHECKING:
    from adapterhub_local.registry.store import Registry

TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "sequence_classification", "FEATURE_EXTRACTION": "feature",
              "TOKEN_CLS": "token_classification", "SEQ_2_SEQ_LM": "seq2seq_lm"}


def import_adapter(registry: Registry, name: str, source: Path, base: str, info: CardInfo) -> AdapterCard:
    """Admit and publish ``source`` as the next version of ``name`` on ``base``."""
    validate_name(name, "adapter name")
    record = registry.base(base)
    staged = registry.new_staging()
    try:
        try:
            copied = stage_source(source, staged)
        except OSError as exc:
            raise storage_error(exc, staged, "copy the adapter into") from exc
        summary = admit(registry, staged, record, str(source))
        if copied.has_card:
            theirs = AdapterCard.load(staged / CARD_FILE)
            check_foreign_base(registry, theirs, record)
            info = merge_info(theirs, info)
            (staged / CARD_FILE).unlink()
        card = make_card(name, summary, record, info, copied.files)
        return registry.publish(staged, card)
    finally:
        with contextlib.suppress(OSError):
            atomic.remove_tree(staged)


def admit(registry: Registry, directory: Path, record: BaseRecord, where: str) -> AdapterSummary:
    """Run the import gate on the staged files; raise one error listing every problem."""
    summary, problems = inspect_version(directory)
    if summary is None or problems:
        raise_problems(problems, f"cannot import {where}")
    assert summary is not None
    fit = base_fit(summary, record)
    if fit:
        others = [r for r in fitting_bases(summary, registry.list_bases()) if r.name != record.name]
        hint = ("; it fits " + ", ".join(f"base {r.name!r} (fingerprint {r.short})" for r in others)
                if others else "; it fits none of the registered bases")
        raise_problems(fit, f"cannot import {where}: adapter does not fit base {record.name!r} "
                            f"(fingerprint {record.short}){hint}")
    return summary


def check_foreign_base(registry: Registry, theirs: AdapterCard, record: BaseRecord) -> None:
    """A card made on another base (by fingerprint) is refused, naming both bases."""
    if not theirs.base_fingerprint or theirs.base_fingerprint == record.fingerprint:
        return
    known = [r for r in registry.list_bases() if r.fingerprint == theirs.base_fingerprint]
    here = f", registered here as base {known[0].name!r}" if known else ", not registered here"
    raise FingerprintMismatchError(
        f"adapter {theirs.ref} was made on base {theirs.base!r} (fingerprint {theirs.base_fingerprint[:12]}{here}), "
        f"not on base {record.name!r} (fingerprint {record.short})",
        f"import it with --base {known[0].name}" if known else "register the base it was trained on and import onto it",
    )


def make_card(name: str, summary: AdapterSummary, record: BaseRecord, info: CardInfo,
              files: dict[str, str]) -> AdapterCard:
    """The card of a new version (its number is set when it is published)."""
    task_type = info.task_type or TASK_TYPES.get(str(summary.task_type))
    return AdapterCard(
        **{**info.__dict__, "task_type": task_type},
        name=name, kind=summary.kind, rank=summary.rank, alpha=summary.alpha,
        target_modules=summary.target_modules,
        modules_to_save=sorted({str(m) for m in summary.config.get("modules_to_save") or []}),
        num_virtual_tokens=summary.num_virtual_tokens, base=record.name, base_fingerprint=record.fingerprint,
        files=files, created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    )
