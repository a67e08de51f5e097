"""A per-request composition (``model: "task-a*0.7+style-b@2*0.3"``) resolved against the registry, and the
adapter it is served as.

:func:`resolve_composition` checks every part (a registered LoRA adapter of the serving base, no classifier
head, one task type, each version once) and describes the composition with a card of its own: kind ``lora``,
rank ``Σ rᵢ``, the parents in ``composition`` (method ``cat``), and as content hash the hash of the parents'
content hashes and weights — so caches key it by content. :func:`build` makes its LoRA pairs with
:func:`~adapterhub_local.compose.cat.cat_pairs`, the function the stored ``cat`` method uses: a composed row is
exactly the stored combination's row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from adapterhub_local.compose.cat import cat_pairs, parent_rank
from adapterhub_local.compose.spec import canonical, parse_composition
from adapterhub_local.errors import InvalidReferenceError, UnsupportedError
from adapterhub_local.lora import LoraPair
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.store import Registry
from adapterhub_local.task_spec import SPEC_KEY, spec_from_card

COMPOSITION_NAME = "composition"
"""The ``name`` on a composition's card (it is not a registry version)."""
COMPOSITION_FILE = "composition.json"


@dataclass(frozen=True)
class Composition:
    """A resolved per-request composition."""

    key: str
    """Canonical spelling (``name@N*w+…``, the user's order): the pool's key and the name results report."""
    parents: tuple[AdapterCard, ...]
    weights: tuple[float, ...]
    card: AdapterCard
    """Describes the composition (see the module docstring)."""


def resolve_composition(registry: Registry, text: str, base: str) -> Composition:
    """Resolve ``text`` for serving on ``base``; raises the project's errors (unknown adapter → NotFoundError,
    another base → FingerprintMismatchError, bad syntax or weights → InvalidReferenceError, a soft prompt or a
    classifier → UnsupportedError)."""
    parts = parse_composition(text)
    cards = [registry.resolve(part.ref) for part in parts]
    for card in cards:
        registry.check_base(card, base)
        if card.kind != "lora":
            what = "a soft prompt" if card.kind == "prompt" else f"a {card.kind} version"
            raise UnsupportedError(f"{card.ref} in {text!r} is {what}; only LoRA adapters compose",
                                   "send a soft prompt on its own, or compose LoRA adapters")
        if card.modules_to_save:
            raise UnsupportedError(f"{card.ref} in {text!r} carries a classifier head; heads do not compose",
                                   "compose adapters without a head")
    refs = [c.ref for c in cards]
    if len(set(refs)) != len(refs):
        raise InvalidReferenceError(f"{text!r} names {sorted({r for r in refs if refs.count(r) > 1})} more than once",
                                    "name each adapter version once and add its weights together")
    if len({c.task_type for c in cards}) > 1:
        raise UnsupportedError(f"{text!r} mixes task types {sorted({str(c.task_type) for c in cards})}",
                               "compose adapters of one task type")
    weights = tuple(p.weight for p in parts)
    return Composition(canonical(list(zip(refs, weights, strict=True))), tuple(cards), weights,
                       _card(cards, weights))


def _card(cards: list[AdapterCard], weights: tuple[float, ...]) -> AdapterCard:
    identity = json.dumps([[c.content_hash, w] for c, w in zip(cards, weights, strict=True)])
    rank = sum(c.rank or 0 for c in cards)
    specs = [spec_from_card(c.extra, c.recipe, c.labels, where=f"card of {c.ref}") for c in cards]
    shared = {json.dumps(None if s is None else s.to_dict(), sort_keys=True) for s in specs}
    first = cards[0]
    return AdapterCard(
        name=COMPOSITION_NAME, version=1, kind="lora", rank=rank, alpha=float(rank),
        target_modules=sorted({t for c in cards for t in c.target_modules}),
        task="+".join(dict.fromkeys(c.task for c in cards if c.task)) or None, task_type=first.task_type,
        extra={SPEC_KEY: specs[0].to_dict()} if len(shared) == 1 and specs[0] is not None else {},
        base=first.base, base_fingerprint=first.base_fingerprint,
        files={COMPOSITION_FILE: hashlib.sha256(identity.encode()).hexdigest()},
        composition={"method": "cat", "params": {},
                     "parents": [{"name": c.name, "version": c.version, "content_hash": c.content_hash,
                                  "weight": w} for c, w in zip(cards, weights, strict=True)]},
    )


def build(parents: list[dict[str, LoraPair]], weights: tuple[float, ...]) -> dict[str, LoraPair]:
    """The composition's LoRA pairs (scale 1, rank ``Σ rᵢ``) from the parents' pairs."""
    assert all(parents) and len(parents) == len(weights)
    assert sum(parent_rank(p) for p in parents) >= 1
    return cat_pairs(list(zip(parents, weights, strict=True)))
