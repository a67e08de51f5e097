"""How a LoRA update relates to the frozen weight it adapts: the LoRA paper's §7.3 (Hu et al. 2021, Table 7).

For one module with frozen weight ``W`` (``[d_out, d_in]``) and update ``ΔW = U S Vᵀ``, take ``U_k``, ``V_k``, the
top-``k`` left and right singular vectors of ``ΔW``, and project ``W`` onto them: ``‖U_kᵀ W V_k‖_F``. Beside it,
the same projection onto ``W``'s own top-``k`` singular vectors (``√(Σ_{i≤k} σ_i(W)²)``, the most ``W`` can put in
any ``k`` directions) and onto random ``k``-frames. The paper's reading: when the projection onto ``ΔW``'s
directions is well above random but far below ``W``'s own, the update *amplifies* directions that ``W`` already
has but does not emphasise; the **amplification factor** ``‖ΔW‖_F / ‖U_kᵀ W V_k‖_F`` says by how much (about 21.5
for GPT-3's ``W_q`` at r = 4, about 1.9 at r = 64, layer 48).

The random figure here is exact rather than one draw: for independent uniformly random orthonormal frames
``E‖U_kᵀ W V_k‖_F² = (k / d_out)(k / d_in) ‖W‖_F²``, so it is reported as that root mean square.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.errors import FormatError, UnsupportedError

WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class Amplification:
    """One module: how its update's top-``k`` directions meet its frozen weight."""

    module: str
    k: int
    """How many of ΔW's directions the projections keep."""
    weight_norm: float
    """``‖W‖_F``."""
    delta_norm: float
    """``‖ΔW‖_F``."""
    onto_delta: float
    """``‖U_kᵀ W V_k‖_F`` with ``U_k``, ``V_k`` from ΔW."""
    onto_weight: float
    """The same with ``W``'s own top-``k`` singular vectors: ``√(Σ_{i≤k} σ_i(W)²)``."""
    onto_random: float
    """Its root mean square over random orthonormal ``k``-frames: ``k ‖W‖_F / √(d_out d_in)``."""

    @property
    def factor(self) -> float:
        """``‖ΔW‖_F / ‖U_kᵀ W V_k‖_F`` (infinite when ΔW's directions miss W entirely)."""
        return self.delta_norm / self.onto_delta if self.onto_delta > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factor": self.factor}


EXACT_SPECTRUM_SIDE = 1024
"""Weights whose smaller side is at most this get an exact float64 SVD (576² takes ~0.1 s); larger ones (a 7B
model's 4096² projections, tens of seconds each in float64) get a cheaper one, see :func:`top_singular_values`."""


def top_singular_values(weight: torch.Tensor, k: int) -> torch.Tensor:
    """``W``'s ``k`` largest singular values in float64, largest first. Exact (float64) up to
    :data:`EXACT_SPECTRUM_SIDE`; above it, for ``k`` small beside the matrix, a float32 randomized range finder with
    power iterations (Halko et al.; ``torch.svd_lowrank``, seeded) — on SmolLM2's projections its
    ``√(Σ_{i≤k} σ_i²)`` is within 0.1 % of the exact figure for k ≤ 32 — and an exact float32 SVD otherwise."""
    side = min(weight.shape)
    k = min(k, side)
    if side <= EXACT_SPECTRUM_SIDE:
        return torch.linalg.svdvals(weight.to(torch.float64))[:k]
    sketch = min(2 * k + 16, side)
    if sketch > side // 4:
        return torch.linalg.svdvals(weight.to(torch.float32))[:k].to(torch.float64)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same figures every time, and nobody else's random stream consumed
    try:
        _, sigma, _ = torch.svd_lowrank(weight.to(torch.float32), q=sketch, niter=8)
    finally:
        torch.random.set_rng_state(generator_state)
    return sigma[:k].to(torch.float64)


def default_k(rank: int, d_out: int, d_in: int) -> int:
    """The paper projects at the adapter's own rank; capped at a quarter of the smaller side, since a projection
    onto most of the space says only that ``W`` is there (at ``k = min(d_out, d_in)`` it is all of ``‖W‖_F``)."""
    return max(1, min(rank, max(1, min(d_out, d_in) // 4)))


def module_amplification(module: str, weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                         k: int, weight_singular_values: torch.Tensor | None = None) -> Amplification:
    """§7.3's figures for one module, from ``W`` and the thin SVD of its update (``U [d_out, m]``, ``S [m]``,
    ``Vh [m, d_in]``; :func:`adapterhub_local.sweep.analysis.factored_svd`). ``k`` is capped at ``m``;
    ``weight_singular_values``: at least ``W``'s top ``k`` (:func:`top_singular_values` when not given)."""
    w = weight.to(torch.float64)
    if w.dim() != 2 or w.shape != (u.shape[0], vh.shape[1]):
        raise FormatError(f"{module}: base weight {list(weight.shape)} does not match the update "
                          f"[{u.shape[0]}, {vh.shape[1]}]", "compare adapters with the base they were trained on")
    if k < 1:
        raise UnsupportedError(f"projection rank must be at least 1, got {k}", "pass a positive rank")
    k = min(k, int(s.shape[0]))
    d_out, d_in = w.shape
    weight_norm = float(torch.linalg.matrix_norm(w))
    projected = u[:, :k].to(torch.float64).T @ w @ vh[:k].to(torch.float64).T
    sigma = (top_singular_values(w, k) if weight_singular_values is None
             else weight_singular_values.to(torch.float64))
    if sigma.shape[0] < min(k, d_out, d_in):
        raise ValueError(f"{module}: {sigma.shape[0]} singular values of W given for k = {k}")
    return Amplification(
        module=module, k=k, weight_norm=weight_norm, delta_norm=float(torch.linalg.vector_norm(s.to(torch.float64))),
        onto_delta=float(torch.linalg.matrix_norm(projected)),
        onto_weight=float(torch.linalg.vector_norm(sigma[:k])),
        onto_random=k * weight_norm / math.sqrt(d_out * d_in),
    )


def weight_key(module: str, keys: Iterable[str]) -> str:
    """The base checkpoint's key for ``module``'s weight. Adapter module paths and checkpoint keys may differ by
    a leading wrapper (``bert.`` on a classifier adapter over a bare encoder checkpoint, or the other way round),
    so the match is on whole dotted components at the end; more than one match, or none, is refused."""
    wanted = (module + WEIGHT_SUFFIX).split(".")
    candidates = []
    for key in keys:
        parts = key.split(".")
        shorter, longer = sorted((parts, wanted), key=len)
        if longer[len(longer) - len(shorter):] == shorter and len(shorter) > 2:
            candidates.append(key)
    exact = [c for c in candidates if c == module + WEIGHT_SUFFIX]
    if exact:
        return exact[0]
    if len(candidates) != 1:
        found = ", ".join(sorted(candidates)[:4]) or "none"
        raise FormatError(f"no single base weight for module {module!r} (matches: {found})",
                          "compare adapters whose base is registered with its original checkpoint")
    return candidates[0]


def read_base_weights(model_dir: Path, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """The frozen weight of each module, read from the base's safetensors files (only those tensors)."""
    from safetensors import safe_open

    from adapterhub_local.registry.fingerprint import weight_files

    located: dict[str, Path] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                located[key] = path
    wanted: dict[Path, list[tuple[str, str]]] = {}  # file -> (key, module): each file opened once more
    for module in modules:
        key = weight_key(module, located)
        wanted.setdefault(located[key], []).append((key, module))
    weights: dict[str, torch.Tensor] = {}
    for path, keys in wanted.items():
        with safe_open(str(path), framework="pt") as handle:
            for key, module in keys:
                weights[module] = handle.get_tensor(key)
    return weights


def summarise(rows: list[Amplification]) -> dict[str, dict[str, float]]:
    """Per kind of module (the last path component: ``q_proj``, ``v_proj`` …), the mean of each figure over its
    layers and the **median** amplification factor (per layer it is a ratio with a small denominator, so a few
    layers where ΔW's directions nearly miss W would swamp a mean)."""
    groups: dict[str, list[Amplification]] = {}
    for row in rows:
        groups.setdefault(row.module.rsplit(".", 1)[-1], []).append(row)
    summary = {}
    for kind, members in sorted(groups.items()):
        n = len(members)
        summary[kind] = {
            "modules": float(n), "k": sum(m.k for m in members) / n,
            "weight_norm": sum(m.weight_norm for m in members) / n,
            "delta_norm": sum(m.delta_norm for m in members) / n,
            "onto_delta": sum(m.onto_delta for m in members) / n,
            "onto_weight": sum(m.onto_weight for m in members) / n,
            "onto_random": sum(m.onto_random for m in members) / n,
            "factor": statistics.median(m.factor for m in members),
        }
    return summary
