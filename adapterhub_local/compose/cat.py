"""The exact combination: LoRA adapters concatenated along the rank.

For parents with pairs ``(Aᵢ, Bᵢ, sᵢ)`` and weights ``wᵢ``, every module gets ::

    A = [w₁·s₁·A₁; w₂·s₂·A₂; …]      [R, d_in]   (rows stacked)
    B = [B₁, B₂, …]                  [d_out, R]  (columns concatenated)
    B @ A = Σ wᵢ · sᵢ · Bᵢ @ Aᵢ      (the weighted sum of the deltas, exactly)

with scale 1 (stored as ``r = lora_alpha = R``), ``R = Σ Rᵢ`` and ``Rᵢ`` the largest rank of parent ``i``. This
is PEFT's ``add_weighted_adapter(combination_type="cat")`` (weight and scale on the ``A`` side, parents that do
not adapt a module leave their block out, the rest of the rank is zero), so a stored ``cat`` adapter loads in PEFT
unchanged, and the serving pool builds the same operands per request with this same function — a composed row
equals the stored combination's row.
"""

from __future__ import annotations

import torch

from adapterhub_local.errors import ShapeMismatchError
from adapterhub_local.lora import LoraPair


def parent_rank(pairs: dict[str, LoraPair]) -> int:
    """The rank a parent contributes to the combination: its largest module rank (PEFT's choice)."""
    return max(p.rank for p in pairs.values())


def cat_pairs(parents: list[tuple[dict[str, LoraPair], float]]) -> dict[str, LoraPair]:
    """Module → combined pair (scale 1) for ``[(pairs, weight), …]``; every module any parent adapts."""
    total = sum(parent_rank(pairs) for pairs, _ in parents)
    modules = sorted({name for pairs, _ in parents for name in pairs})
    combined: dict[str, LoraPair] = {}
    for name in modules:
        present = [(pairs[name], weight) for pairs, weight in parents if name in pairs]
        d_in, d_out = int(present[0][0].a.shape[1]), int(present[0][0].b.shape[0])
        if any((int(p.a.shape[1]), int(p.b.shape[0])) != (d_in, d_out) for p, _ in present):
            raise ShapeMismatchError(f"the parents' LoRA pairs on {name} have different shapes "
                                     f"{[(list(p.a.shape), list(p.b.shape)) for p, _ in present]}",
                                     "combine adapters made for the same base")
        a = torch.zeros(total, d_in, dtype=torch.float32)
        b = torch.zeros(d_out, total, dtype=torch.float32)
        start = 0
        for pair, weight in present:
            end = start + pair.rank
            a[start:end] = pair.a.to(torch.float32) * weight * pair.scale
            b[:, start:end] = pair.b.to(torch.float32)
            start = end
        combined[name] = LoraPair(name, a, b, 1.0)
    return combined
