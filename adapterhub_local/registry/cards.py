"""``card.json``: this project's metadata for one adapter version, beside PEFT's own files.

The card records what the adapter is (kind, rank, alpha, targets, task), what it was made on and from
(base fingerprint, resolved recipe, dataset fingerprint, parent), how good it is (metrics), and the
sha256 of every other file in the version directory so damage is detected on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError

CARD_FILE = "card.json"
CARD_SCHEMA = 1


@dataclass
class CardInfo:
    """What the caller knows about an adapter when registering it (the rest is filled in by the store)."""

    task: str | None = None
    """Task name, e.g. ``sentiment`` or ``e2e``."""
    task_type: str | None = None
    """``causal_lm`` | ``sequence_classification`` | ``feature`` — how to put the adapter to work."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The resolved training recipe (empty for imports)."""
    dataset_fingerprint: str | None = None
    """sha256 of the training data as used."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Evaluation results (accuracy, BLEU …)."""
    parent: str | None = None
    """``name@version`` this adapter was derived from (truncation, continued training)."""
    labels: list[str] | None = None
    """Class labels, in head order, for classifier adapters."""
    training: dict[str, Any] = field(default_factory=dict)
    """Run facts: trainable parameters, wall time, peak memory, tokens/s, forgetting."""
    source: str | None = None
    """Where an imported adapter came from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (e.g. pooling for classifier heads)."""


@dataclass
class AdapterCard(CardInfo):
    """The full card as stored: caller info plus the facts the store derives."""

    name: str = ""
    version: int = 0
    kind: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    num_virtual_tokens: int | None = None
    base: str = ""
    base_fingerprint: str = ""
    files: dict[str, str] = field(default_factory=dict)
    """File name → sha256 of every file in the version directory except the card."""
    created: str = ""
    schema: int = CARD_SCHEMA

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> AdapterCard:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FormatError(f"{where}: unknown card fields {unknown}", "upgrade adapterhub_local or fix the card")
        try:
            return cls(**data)
        except TypeError as exc:
            raise FormatError(f"{where}: malformed card ({exc})", "restore the version from an export") from exc

    @classmethod
    def load(cls, path: Path) -> AdapterCard:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FormatError(f"{path} is missing", "the version is torn; delete it and re-register") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path} is not valid JSON", "restore the version from an export") from exc
        if not isinstance(data, dict):
            raise FormatError(f"{path} is not a JSON object", "restore the version from an export")
        return cls.from_dict(data, str(path))
