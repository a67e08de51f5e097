"""``adapterhub combine``: several registered LoRA adapters → one new registered adapter.

The parents are loaded verified (sha256 of every file), checked to be combinable — LoRA, one base (by
fingerprint), one task type, the same weight layout, no classifier head, no DoRA or trained biases — and combined
by the chosen method (``cat`` here, exactly; the others by PEFT, :mod:`methods`). The result is written as a
plain PEFT directory and registered through the registry's normal import path (the admission gate, staging,
atomic publish), with a card whose ``composition`` names every parent (name, version, content hash, weight),
the method and its parameters.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from adapterhub_local.compose.cat import cat_pairs
from adapterhub_local.compose.methods import DENSITY_METHODS, METHODS, SIGNED_METHODS, peft_combine
from adapterhub_local.compose.spec import MAX_PARTS, check_weight
from adapterhub_local.errors import (
    ConfigError,
    FingerprintMismatchError,
    InvalidReferenceError,
    UnsupportedError,
)
from adapterhub_local.lora import PEFT_PREFIX, LoraPair, lora_pairs
from adapterhub_local.registry import atomic
from adapterhub_local.registry.cards import AdapterCard, CardInfo
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterhub_local.registry.names import validate_name
from adapterhub_local.registry.store import LoadedAdapter, Registry
from adapterhub_local.task_spec import SPEC_KEY, spec_from_card


@dataclass
class CombineOptions:
    """How to combine (``adapterhub combine`` options)."""

    method: str = "cat"
    """``cat`` (exact) | ``linear`` | ``svd`` | ``ties`` | ``dare_linear`` | ``dare_ties``."""
    rank: int | None = None
    """``svd`` only: the result's rank (default: the largest parent rank)."""
    density: float | None = None
    """``ties`` / ``dare_*`` only: the fraction of entries kept, in (0, 1]."""
    seed: int = 0
    """``dare_*`` only: the random drop pattern's seed."""

    def problems(self, weights: list[float]) -> list[str]:
        """Every option that does not fit the method (one line each)."""
        out: list[str] = []
        if self.method not in METHODS:
            out.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
            return out
        if self.rank is not None and self.method != "svd":
            out.append(f"--rank applies to svd only (cat's rank is the sum of the parents' ranks; {self.method} "
                       "keeps the parents' rank)")
        if self.rank is not None and self.rank < 1:
            out.append(f"--rank must be >= 1 (got {self.rank})")
        if self.method in DENSITY_METHODS:
            if self.density is None:
                out.append(f"{self.method} needs --density D in (0, 1] (the fraction of entries kept, e.g. 0.5)")
            elif not 0 < self.density <= 1:
                out.append(f"--density must be in (0, 1] (got {self.density})")
        elif self.density is not None:
            out.append(f"--density applies to {', '.join(DENSITY_METHODS)} only")
        if self.method in SIGNED_METHODS and any(w < 0 for w in weights):
            out.append(f"{self.method} elects a sign per entry, so a negative weight does not subtract an adapter; "
                       "use cat, linear or svd to subtract one")
        if self.seed < 0:
            out.append(f"--seed must be >= 0 (got {self.seed})")
        return out

    def params(self) -> dict[str, Any]:
        """The parameters that shaped the result (recorded on the card)."""
        out: dict[str, Any] = {}
        if self.method == "svd":
            out["rank"] = self.rank
        if self.method in DENSITY_METHODS:
            out["density"] = self.density
        if self.method.startswith("dare"):
            out["seed"] = self.seed
        return out


def check_parents(parents: list[LoadedAdapter]) -> None:
    """Refuse parents that cannot be combined, with the reason and the fix."""
    refs = [p.card.ref for p in parents]
    for parent in parents:
        card, config = parent.card, parent.config
        if card.kind != "lora":
            what = "a soft prompt" if card.kind == "prompt" else f"a {card.kind} version"
            raise UnsupportedError(f"{card.ref} is {what}; only LoRA adapters can be combined",
                                   "combine LoRA adapters; serve a soft prompt on its own")
        if any(".lora_embedding_" in k or ".token_adapter." in k for k in parent.tensors):
            raise UnsupportedError(f"{card.ref} has an embedding LoRA or trainable tokens; combining adds LoRA pairs "
                                   "on linear layers only", "combine adapters whose LoRA is on linear layers only")
        if card.modules_to_save or any(not _is_lora_key(k) for k in parent.tensors):
            raise UnsupportedError(f"{card.ref} carries a trained head (modules_to_save); heads cannot be added up",
                                   "combine adapters without a classifier head")
        if config.get("use_dora"):
            raise UnsupportedError(f"{card.ref} uses DoRA; its magnitude vectors do not combine linearly",
                                   "combine plain LoRA adapters")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise UnsupportedError(f"{card.ref} trains biases", "combine adapters trained with bias='none'")
    first = parents[0]
    for parent in parents[1:]:
        card = parent.card
        if card.base_fingerprint != first.card.base_fingerprint:
            raise FingerprintMismatchError(
                f"{card.ref} was made on base {card.base!r} (fingerprint {card.base_fingerprint[:12]}) and "
                f"{first.card.ref} on base {first.card.base!r} (fingerprint {first.card.base_fingerprint[:12]})",
                "combine adapters of one base")
        if card.task_type != first.card.task_type:
            raise UnsupportedError(f"{card.ref} is a {card.task_type} adapter and {first.card.ref} a "
                                   f"{first.card.task_type} one", "combine adapters of one task type")
        if bool(parent.config.get("fan_in_fan_out")) != bool(first.config.get("fan_in_fan_out")):
            raise UnsupportedError(f"{card.ref} and {first.card.ref} store their weights transposed differently "
                                   "(fan_in_fan_out)", "re-save both with the same PEFT setting")
        if isinstance(parent.config.get("target_modules"), str) != isinstance(first.config.get("target_modules"), str):
            raise UnsupportedError(f"{card.ref} and {first.card.ref} name their targets differently (a regex and a "
                                   "list)", "re-save them with target_modules as a list")
    if len(set(refs)) != len(refs):
        raise InvalidReferenceError(f"the parents {refs} name a version more than once",
                                    "name each adapter once and add its weights")


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def combine(registry: Registry, refs: list[str], weights: list[float], name: str,
            options: CombineOptions | None = None) -> AdapterCard:
    """Combine ``refs`` with ``weights`` into a new version of ``name``; returns its card."""
    options = options or CombineOptions()
    validate_name(name, "adapter name")
    problems = [] if 2 <= len(refs) <= 2 * MAX_PARTS else [f"give 2 to {2 * MAX_PARTS} adapters (got {len(refs)})"]
    if len(weights) != len(refs):
        problems.append(f"{len(weights)} weight(s) for {len(refs)} adapter(s)")
    for i, weight in enumerate(weights, 1):
        try:
            check_weight(weight, f"weight {i}")
        except InvalidReferenceError as exc:
            problems.append(str(exc))
    problems += options.problems(weights)
    if problems:
        raise ConfigError(problems, "see `adapterhub combine --help`", what="combination")
    parents = [registry.load_adapter(ref) for ref in refs]
    check_parents(parents)
    record = registry.base(parents[0].card.base)
    registry.check_base(parents[0].card, record.name)
    work = registry.new_staging()
    try:
        if options.method == "cat":
            source = _write_cat(parents, weights, work / "out")
        else:
            source = peft_combine(record, parents[0].card.task_type, [p.path for p in parents], weights,
                                  options.method, options.rank, options.density, options.seed, work / "out")
        return registry.register_adapter(name, source, record.name, _info(parents, weights, options))
    finally:
        with contextlib.suppress(OSError):
            atomic.remove_tree(work)


def _write_cat(parents: list[LoadedAdapter], weights: list[float], out: Path) -> Path:
    """The exact ``cat`` combination as a PEFT directory (config modelled on the first parent's, as PEFT does)."""
    pairs: list[tuple[dict[str, LoraPair], float]] = [
        (lora_pairs(p.tensors, p.config), w) for p, w in zip(parents, weights, strict=True)]
    combined = cat_pairs(pairs)
    rank = int(next(iter(combined.values())).a.shape[0])
    tensors = {}
    for module, pair in combined.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = pair.a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = pair.b.contiguous()
    config = dict(parents[0].config)
    targets = [p.config.get("target_modules") for p in parents]
    if all(isinstance(t, str) for t in targets):
        config["target_modules"] = "|".join(f"({t})" for t in targets)
    else:
        config["target_modules"] = sorted({str(m) for t in targets if isinstance(t, list) for m in t})
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    out.mkdir(parents=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return out


def _info(parents: list[LoadedAdapter], weights: list[float], options: CombineOptions) -> CardInfo:
    """The child's card info: its lineage, the shared task type, and the task spec if all parents share one."""
    cards = [p.card for p in parents]
    specs = [spec_from_card(c.extra, c.recipe, c.labels, where=f"card of {c.ref}") for c in cards]
    shared = {json.dumps(None if s is None else s.to_dict(), sort_keys=True) for s in specs}
    extra = {SPEC_KEY: specs[0].to_dict()} if len(shared) == 1 and specs[0] is not None else {}
    tasks = list(dict.fromkeys(c.task for c in cards if c.task))
    return CardInfo(
        task="+".join(tasks) or None, task_type=cards[0].task_type, extra=extra,
        source=f"adapterhub combine --method {options.method}",
        composition={"method": options.method, "params": options.params(),
                     "parents": [{"name": c.name, "version": c.version, "content_hash": c.content_hash,
                                  "weight": float(w)} for c, w in zip(cards, weights, strict=True)]},
    )
