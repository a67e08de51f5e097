"""Parsing what a user writes to compose adapters: the per-request form ``name*0.7+other@2*0.3`` and the
``--weights 0.7,0.3`` list of ``adapterhub combine``, each checked strictly (finite, non-zero weights, at most
:data:`MAX_PARTS` parts, every adapter once, canonical references).

Grammar of a per-request composition (no spaces)::

    composition := part ("+" part)*          at most 8 parts
    part        := reference "*" weight      reference: name | name@N | name:tag | sha256:<hex>
    weight      := -?digits[.digits][e-?digits]   finite, non-zero (negative subtracts the adapter)

A string is a composition exactly when it contains ``*`` (no registry name or reference can: see
:mod:`adapterhub_local.registry.names`), so a plain adapter name never changes meaning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from adapterhub_local.errors import InvalidReferenceError
from adapterhub_local.registry.names import parse_reference

MAX_PARTS = 8
"""Most adapters one composition may name (rank grows with every part: Σ rᵢ)."""
MAX_WEIGHT = 1000.0
"""Largest |weight| accepted (a bigger one is a typo, and it overflows half precision)."""
_WEIGHT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]-?[0-9]{1,3})?", re.ASCII)
_FORM = ("write adapters as REF*WEIGHT joined by '+', e.g. task-a*0.7+style-b@2*0.3 (REF: name, name@N, "
         f"name:tag or sha256:<prefix>; WEIGHT a finite non-zero number; at most {MAX_PARTS} parts)")


@dataclass(frozen=True)
class Part:
    """One adapter of a composition and its weight."""

    ref: str
    weight: float


def is_composition(text: str) -> bool:
    """Whether ``text`` asks for a composition rather than one adapter (it contains ``*``)."""
    return isinstance(text, str) and "*" in text


def parse_weight(text: str, where: str, fix: str = _FORM) -> float:
    """A weight as written: a plain decimal number, finite, non-zero, |w| <= :data:`MAX_WEIGHT`."""
    if not _WEIGHT.fullmatch(text):
        raise InvalidReferenceError(f"{where}: weight {text!r} is not a plain finite number", fix)
    value = float(text)
    check_weight(value, where)
    return value


def check_weight(value: float, where: str) -> None:
    """Refuse NaN, inf, zero and absurdly large weights, naming the one at fault."""
    if not math.isfinite(value):
        raise InvalidReferenceError(f"{where}: weight {value!r} is not finite", "give a finite number")
    if value == 0:
        raise InvalidReferenceError(f"{where}: weight 0 adds nothing", "drop that adapter instead of weighting it 0")
    if abs(value) > MAX_WEIGHT:
        raise InvalidReferenceError(f"{where}: |weight| {value!r} exceeds {MAX_WEIGHT:g}",
                                    "weights scale each adapter's delta; use values around 0.1 … 2")


def parse_composition(text: str) -> list[Part]:
    """The parts of ``a*0.7+b*0.3``; raises :class:`InvalidReferenceError` naming the first problem."""
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError("empty composition", _FORM)
    if text != text.strip() or any(c.isspace() or not c.isprintable() for c in text):
        raise InvalidReferenceError(f"composition {text!r} contains whitespace or control characters", _FORM)
    pieces = text.split("+")
    if len(pieces) > MAX_PARTS:
        raise InvalidReferenceError(f"composition {text!r} has {len(pieces)} parts; at most {MAX_PARTS} are allowed",
                                    "combine fewer adapters, or store a combination with `adapterhub combine`")
    parts: list[Part] = []
    for i, piece in enumerate(pieces, 1):
        ref, star, weight = piece.rpartition("*")
        if not star or not ref or "*" in ref:
            raise InvalidReferenceError(f"part {i} of composition {text!r} ({piece!r}) is not REF*WEIGHT", _FORM)
        parse_reference(ref)  # canonical reference syntax, or a precise error
        parts.append(Part(ref, parse_weight(weight, f"part {i} ({piece!r})")))
    refs = [p.ref for p in parts]
    repeated = sorted({r for r in refs if refs.count(r) > 1})
    if repeated:
        raise InvalidReferenceError(f"composition {text!r} names {repeated} more than once",
                                    "name each adapter once and add its weights together")
    return parts


def parse_weights(text: str, count: int) -> list[float]:
    """``--weights 0.7,0.3`` for ``count`` adapters."""
    items = [t.strip() for t in text.split(",")]
    if len(items) != count:
        raise InvalidReferenceError(f"--weights gives {len(items)} weight(s) for {count} adapter(s)",
                                    "give one weight per adapter, comma separated, e.g. --weights 0.7,0.3")
    fix = "give one finite non-zero number per adapter, comma separated, e.g. --weights 0.7,-0.3"
    return [parse_weight(t, f"--weights item {i}", fix) for i, t in enumerate(items, 1)]


def canonical(parts: list[tuple[str, float]]) -> str:
    """The composition written with resolved ``name@N`` references: the key the engine's pool caches it under
    and the ``model`` echoed back (weights in Python's shortest round-trip form, so equal floats spell equal)."""
    return "+".join(f"{ref}*{weight!r}" for ref, weight in parts)
