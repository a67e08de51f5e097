"""Keeping a registry healthy: verify every byte, rebuild the index from the directories, collect
garbage left by killed writers, and export versions as plain PEFT directories.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_local.errors import AdapterHubError, AlreadyExistsError
from adapterhub_local.registry import atomic
from adapterhub_local.registry.cards import CARD_FILE
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
    """Check sha256 of every file of one version (``ref``) or of all versions, and every base's record."""
    report = VerifyReport()
    if ref is not None:
        cards = [registry.resolve(ref)]
    else:
        cards = []
        for name in registry.adapter_names():
            for version in registry.versions_on_disk(name):
                try:
                    cards.append(registry.card_of(name, version))
                except AdapterHubError as exc:
                    report.problems.append(f"{name}@{version}: {exc}")
    for card in cards:
        report.checked.append(card.ref)
        report.problems.extend(registry.check_files(card))
    return report


def rebuild_index(registry: Registry) -> int:
    """Recreate ``index.db`` from the version directories and tag files; returns versions indexed."""
    rows = []
    tags = {}
    for name in registry.adapter_names():
        for version in registry.versions_on_disk(name):
            rows.append(registry.index_row(registry.card_of(name, version)))
        tags[name] = registry.tag_map(name)
    registry.index.replace_all(rows, tags)
    return len(rows)


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def collect_garbage(registry: Registry, min_age_s: float = STALE_STAGING_SECONDS) -> GcReport:
    """Remove staging directories of dead writers (or older than ``min_age_s``) and heal the index."""
    report = GcReport()
    staging = registry.root / atomic.STAGING_DIR
    now = time.time()
    if staging.exists():
        for item in staging.iterdir():
            pid_text = item.name.split("-", 1)[0]
            dead = pid_text.isdigit() and not atomic.pid_alive(int(pid_text))
            old = now - item.stat().st_mtime > min_age_s
            if dead or old:
                report.freed_bytes += sum(p.stat().st_size for p in item.rglob("*") if p.is_file())
                atomic.remove_tree(item)
                report.removed.append(str(item.relative_to(registry.root)))
    for name_dir in (registry.root / "adapters").iterdir():
        if name_dir.is_dir() and not registry.versions_on_disk(name_dir.name):
            atomic.remove_tree(name_dir)
            report.removed.append(str(name_dir.relative_to(registry.root)))
    registry.list_adapters()  # reconciles the index with the directories
    return report


def export(registry: Registry, ref: str, target: Path, with_card: bool = False) -> Path:
    """Write a verified version as a plain PEFT directory (``adapter_model.safetensors`` +
    ``adapter_config.json``, byte-identical to the stored files; ``card.json`` too if asked). A ``full``
    version exports as the plain transformers directory it stores (``config.json`` + ``model.safetensors``)."""
    card, source = registry.verified_path(ref)
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise AlreadyExistsError(f"export target {target} is not empty", "choose a new or empty directory")
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(card.files) + ([CARD_FILE] if with_card else [])  # every file the card hashes
    for fname in names:
        shutil.copyfile(source / fname, target / fname)
    return target
