"""The approximate combination methods, run by PEFT's own ``add_weighted_adapter`` on the base model.

What each keeps (``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` the parents' deltas, ``wᵢ`` the weights):

* ``cat`` (:mod:`~adapterhub_local.compose.cat`, not here) — exact: ``ΔW = Σ wᵢ·ΔWᵢ`` at rank ``Σ rᵢ``.
* ``svd`` — the best rank-``k`` approximation (``--rank``, default the largest parent rank) of ``Σ wᵢ·ΔWᵢ``:
  exact when ``k ≥`` the rank of the sum, otherwise it keeps the top singular directions.
* ``linear`` — ``A = Σ √|wᵢsᵢ|·sign·Aᵢ``, ``B = Σ √|wᵢsᵢ|·Bᵢ`` (equal ranks only): the product has the cross terms
  ``Bᵢ·Aⱼ``, so it is *not* the weighted sum; cheap and rough (exact only for one parent).
* ``ties`` — TIES-merging on the ``A`` and ``B`` factors separately: keep the top ``density`` fraction of each
  factor's entries by magnitude, elect a sign per entry, average those that agree. Keeps the dominant, agreeing
  directions; drops small and conflicting ones.
* ``dare_linear`` / ``dare_ties`` — DARE: drop entries at random with probability ``1 - density`` and rescale
  the rest by ``1/density`` (unbiased in expectation; ``--seed`` makes it repeatable), then ``linear`` / ``ties``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.models import load_base_model
from adapterhub_local.registry.bases import BaseRecord

PEFT_METHODS = ("linear", "svd", "ties", "dare_linear", "dare_ties")
METHODS = ("cat", *PEFT_METHODS)
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
SIGNED_METHODS = ("ties", "dare_ties")
"""Methods that elect a sign per entry: a negative weight does not subtract an adapter there (it votes against it
and is then averaged in), so it is refused."""
_COMBINED = "combined"


def peft_combine(record: BaseRecord, task_type: str | None, parents: list[Path], weights: list[float], method: str,
                 rank: int | None, density: float | None, seed: int, out: Path) -> Path:
    """Load ``parents`` (PEFT directories) onto the base, run PEFT's ``add_weighted_adapter`` and save the new
    adapter alone as a PEFT directory under ``out``; returns that directory."""
    from peft import PeftModel

    if method not in PEFT_METHODS:
        raise UnsupportedError(f"unknown combination method {method!r}", f"use one of {', '.join(METHODS)}")
    model: Any = load_base_model(record, "causal_lm" if task_type in (None, "causal_lm") else "feature",
                                 dtype=torch.float32)
    peft_model: Any = PeftModel.from_pretrained(model, str(parents[0]), adapter_name="p0")
    for i, path in enumerate(parents[1:], 1):
        peft_model.load_adapter(str(path), adapter_name=f"p{i}")
    names = [f"p{i}" for i in range(len(parents))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model.add_weighted_adapter(names, list(weights), _COMBINED, combination_type=method,
                                            svd_rank=rank, density=density)
        except (ValueError, TypeError) as exc:
            raise UnsupportedError(f"PEFT cannot combine these adapters with {method!r}: {exc}",
                                   "use --method cat (any ranks and targets) or svd") from exc
    peft_model.save_pretrained(str(out), selected_adapters=[_COMBINED])
    return out / _COMBINED
