"""Keeping a registry healthy: verify every byte and every file, rebuild the index from the
directories, collect garbage left by killed writers, and export versions as plain PEFT directories.

``verify`` runs the import gate again on every stored version (so it reports exactly what import would
refuse), checks every file the card lists, the card against the files and the base, tags, version
high-water marks, base records, and anything in the tree that no command wrote (symlinks, strays).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_local.errors import AdapterHubError, AlreadyExistsError
from adapterhub_local.registry import atomic
from adapterhub_local.registry.admission import base_fit, inspect_version
from adapterhub_local.registry.bases import BaseRecord
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterhub_local.registry.safefiles import copy_regular, storage_error
from adapterhub_local.registry.store import Registry

STALE_STAGING_SECONDS = 3600.0


@dataclass
class VerifyReport:
    """Outcome of ``verify``: versions checked and problems found (each names the file)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(registry: Registry, ref: str | None = None) -> VerifyReport:
    """Check one version (``ref``) or the whole registry; never raises for damage, only reports it."""
    report = VerifyReport()
    bases: dict[str, BaseRecord | str] = {}
    if ref is not None:
        _verify_version(registry, registry.resolve(ref), bases, report)
        return report
    report.problems.extend(registry.layout.strays())
    report.problems.extend(registry.stored_problems())
    for name in registry.layout.base_names():
        try:
            registry.base(name)
        except AdapterHubError as exc:
            report.problems.append(f"base {name}: {exc}")
    for name in registry.adapter_names():
        versions = registry.versions_on_disk(name)
        for version in versions:
            try:
                card = registry.card_of(name, version)
            except AdapterHubError as exc:
                report.problems.append(f"{name}@{version}: {exc}")
                continue
            _verify_version(registry, card, bases, report)
        report.problems.extend(_name_problems(registry, name, versions))
    return report


_STORED_AS = {"head": "lora"}
"""Kinds stored in another kind's files: a head-only classifier is a PEFT LoRA dir with a zero LoRA part."""


def _verify_version(registry: Registry, card: AdapterCard, bases: dict[str, BaseRecord | str],
                    report: VerifyReport) -> None:
    report.checked.append(card.ref)
    damaged = registry.check_files(card)
    report.problems.extend(damaged)
    if damaged or set(card.files) != {ADAPTER_WEIGHTS, ADAPTER_CONFIG}:
        return  # unreadable or not an adapter kind this gate knows
    try:
        summary, problems = inspect_version(registry.path_of(card))
    except AdapterHubError as exc:
        report.problems.append(f"{card.ref}: {exc}")
        return
    report.problems.extend(f"{card.ref}: {p.text}" for p in problems)
    if summary is None:
        return
    if card.base not in bases:
        try:
            bases[card.base] = registry.base(card.base)
        except AdapterHubError as exc:
            bases[card.base] = str(exc)
    record = bases[card.base]
    if isinstance(record, str):
        report.problems.append(f"{card.ref}: its base {card.base!r} cannot be read ({record})")
        return
    if record.fingerprint != card.base_fingerprint:
        report.problems.append(f"{card.ref}: made on base fingerprint {card.base_fingerprint[:12]}, but base "
                               f"{card.base!r} now has fingerprint {record.short}")
    report.problems.extend(f"{card.ref}: {p.text}" for p in base_fit(summary, record))
    facts = {"kind": summary.kind, "rank": summary.rank, "alpha": summary.alpha,
             "target_modules": summary.target_modules, "num_virtual_tokens": summary.num_virtual_tokens}
    for key, value in facts.items():
        stated = _STORED_AS.get(card.kind, card.kind) if key == "kind" else getattr(card, key)
        if stated != value:
            report.problems.append(f"{card.ref}: card.json says {key}={getattr(card, key)!r} but the adapter files "
                                   f"say {value!r}")


def _name_problems(registry: Registry, name: str, versions: list[int]) -> list[str]:
    # A tag left pointing at a deleted version (a delete killed after its commit) is not a problem:
    # numbers are never reused, so it can never point at other bytes; resolving it says so and gc prunes it.
    problems = []
    try:
        registry.tag_map(name)
    except AdapterHubError as exc:
        problems.append(str(exc))
    try:
        mark = registry.layout.highwater(name)
        if versions and mark and mark < max(versions):
            problems.append(f"{registry.layout.highwater_path(name)}: high-water mark {mark} is below version "
                            f"{max(versions)} (healed by the next import)")
    except AdapterHubError as exc:
        problems.append(str(exc))
    return problems


def rebuild_index(registry: Registry) -> int:
    """Recreate ``index.db`` from the version directories and tag files (also when the file is corrupt);
    returns versions indexed."""
    return registry.rebuild_index()


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def collect_garbage(registry: Registry, min_age_s: float = STALE_STAGING_SECONDS) -> GcReport:
    """Remove staging directories of dead writers (or older than ``min_age_s``), empty name directories
    and tags left pointing at deleted versions, under the writer lock; heal the index."""
    report = GcReport()
    staging = registry.root / atomic.STAGING_DIR
    now = time.time()
    with registry.locked():
        for item in _children(staging):
            pid_text = item.name.split("-", 1)[0]
            dead = pid_text.isdigit() and not atomic.pid_alive(int(pid_text))
            try:
                old = now - item.lstat().st_mtime > min_age_s
                if not (dead or old):
                    continue
                size = sum(p.lstat().st_size for p in item.rglob("*") if not p.is_symlink() and p.is_file())
                atomic.remove_tree(item)
            except FileNotFoundError:
                continue  # its writer finished meanwhile
            except OSError as exc:
                raise storage_error(exc, item, "remove") from exc
            report.freed_bytes += size
            report.removed.append(str(item.relative_to(registry.root)))
        for temp in registry.layout.temp_files():  # under the lock: no live writer owns one
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
                report.removed.append(str(temp.relative_to(registry.root)))
        for name in registry.adapter_names():
            versions = registry.versions_on_disk(name)
            if not versions:
                with contextlib.suppress(FileNotFoundError):
                    atomic.remove_tree(registry.layout.adapters / name)
                    report.removed.append(f"adapters/{name}")
                continue
            with contextlib.suppress(AdapterHubError):
                report.removed.extend(f"tag {name}:{t}" for t in registry.prune_tags(name, versions))
    registry.list_adapters()  # reconciles the index with the directories
    return report


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def export(registry: Registry, ref: str, target: Path, with_card: bool = False) -> Path:
    """Write a verified version as a plain PEFT directory (``adapter_model.safetensors`` +
    ``adapter_config.json``, byte-identical to the stored files; ``card.json`` too if asked). A ``full``
    version exports as the plain transformers directory it stores (``config.json`` + ``model.safetensors``)."""
    card, source = registry.verified_path(ref)
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExistsError(f"export target {target} is not an empty directory", "choose a new or empty directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
        for fname in sorted(card.files) + ([CARD_FILE] if with_card else []):  # every file the card hashes
            copy_regular(source / fname, source, target / fname, follow_inside=False)
    except OSError as exc:
        raise storage_error(exc, target, "write the export to") from exc
    return target
