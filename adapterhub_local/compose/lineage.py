"""The composition graph: which versions a combined adapter came from, and which combinations a version fed.

A child holds its own weights, so its lineage is information, never a dependency: a deleted parent is shown as
``(deleted)``, and a parent whose bytes are no longer the ones recorded (its content hash changed) as
``(changed)``; the child loads and serves the same either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from adapterhub_local.errors import AdapterHubError
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.store import Registry


@dataclass(frozen=True)
class ParentLink:
    """One parent of a combined adapter, as recorded on the child's card, and its state now."""

    ref: str
    weight: float
    content_hash: str
    state: str
    """``present`` | ``deleted`` | ``changed`` (same name@N, other bytes)."""


def parents(card: AdapterCard) -> list[tuple[str, float, str]]:
    """``(name@N, weight, content hash)`` of each parent (empty for an adapter that is not a combination)."""
    if card.composition is None:
        return []
    return [(f"{p['name']}@{p['version']}", float(p["weight"]), str(p["content_hash"]))
            for p in card.composition["parents"]]


def describe(card: AdapterCard) -> str:
    """``method(a@1*0.7 + b@2*0.3; rank=8)`` for a combination; ``""`` otherwise."""
    if card.composition is None:
        return ""
    terms = " + ".join(f"{ref}*{weight:g}" for ref, weight, _ in parents(card))
    params = "".join(f"; {k}={v}" for k, v in sorted(card.composition["params"].items()) if v is not None)
    return f"{card.composition['method']}({terms}{params})"


def links(registry: Registry, card: AdapterCard) -> list[ParentLink]:
    """The parents of ``card`` with their current state in ``registry``."""
    out = []
    for ref, weight, content_hash in parents(card):
        state = "deleted"
        with contextlib.suppress(AdapterHubError):
            state = "present" if registry.resolve(ref).content_hash == content_hash else "changed"
        out.append(ParentLink(ref, weight, content_hash, state))
    return out


def children(registry: Registry, card: AdapterCard) -> list[str]:
    """The versions combined (directly) from ``card``, matched by content hash and name@N."""
    out = []
    for row in registry.list_adapters():
        with contextlib.suppress(AdapterHubError):
            child = registry.card_of(row.name, row.version)
            if any(ref == card.ref and h == card.content_hash for ref, _, h in parents(child)):
                out.append(child.ref)
    return out


def graph_lines(registry: Registry, cards: list[AdapterCard]) -> list[str]:
    """One line per combined adapter among ``cards``: ``a@1*0.7 + b@2 (deleted)*0.3 --cat--> child@1``."""
    lines = []
    for card in cards:
        if card.composition is None:
            continue
        terms = " + ".join(f"{link.ref}{'' if link.state == 'present' else f' ({link.state})'}*{link.weight:g}"
                           for link in links(registry, card))
        lines.append(f"{terms} --{card.composition['method']}--> {card.ref}")
    return lines


def cards_of(registry: Registry, refs: list[tuple[str, int]]) -> list[AdapterCard]:
    """Readable cards of these versions (a damaged card is skipped here; ``verify`` reports it)."""
    out = []
    for name, version in refs:
        with contextlib.suppress(AdapterHubError):
            out.append(registry.card_of(name, version))
    return out
