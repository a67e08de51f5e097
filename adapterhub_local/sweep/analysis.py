"""The LoRA paper's section 7 analysis of weight updates: singular value spectra, effective rank, and the
normalised subspace similarity between two adapters' update subspaces.

For one module the update is ``ΔW = scale · B @ A`` (``[d_out, d_in]``, from :mod:`adapterhub_local.lora`).
Its SVD ``ΔW = U S Vᵀ`` gives the update's directions; with ``U_i`` the top-``i`` singular vectors of one
update and ``U_j`` the top-``j`` of another, Hu et al. (2021, eq. 4) define

    φ(i, j) = ||U_iᵀ U_j||_F² / min(i, j)  ∈ [0, 1]

(1 when one subspace contains the other, 0 when they are orthogonal). The paper takes the right singular
vectors of ``A``; when ``B`` has full column rank those span the row space of ``ΔW``, so ``side="right"``
(the default, input directions) matches it and ``side="left"`` gives the output directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterhub_local.errors import UnsupportedError

SIDES = ("right", "left")
# Singular values below this fraction of the largest are numerical zeros (the update has lower rank).
_RELATIVE_TOL = 1e-6


@dataclass
class Spectrum:
    """The singular values of one ΔW and the ranks they imply."""

    singular_values: list[float]
    """All ``min(d_out, d_in, r)`` singular values, largest first."""
    numerical_rank: int
    """How many singular values exceed ``1e-6 ×`` the largest."""
    entropy_rank: float
    """Roy & Vetterli's effective rank ``exp(H(p))`` with ``p = s / Σ s`` (numerical zeros dropped)."""
    energy_rank_90: int
    """Smallest ``k`` whose top-``k`` singular values hold 90% of ``Σ s²`` (the Frobenius energy)."""
    energy_rank_99: int
    """The same at 99%."""
    frobenius_norm: float


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (``U [d_out, k]``, ``S [k]``, ``Vh [k, d_in]``, ``k = min(d_out, d_in)``)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return u, s, vh


def factored_svd(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``ΔW = scale · B @ A`` from its factors, never forming ``ΔW`` (``O(d·r²)``, not ``O(d³)``).

    With reduced QRs ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``: ``ΔW = Q_B (scale · R_B R_Aᵀ) Q_Aᵀ``, so the SVD of
    the small core ``U_c S V_cᵀ`` gives ``U = Q_B U_c``, ``S``, ``Vᵀ = V_cᵀ Q_Aᵀ``. Returns ``U [d_out, k]``,
    ``S [k]``, ``Vh [k, d_in]`` with ``k = min(d_out, d_in, r)``, largest first, in float64.
    """
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))  # [d_out, m], [m, r]
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)  # [d_in, n], [n, r]
    u_c, s, vh_c = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    return q_b @ u_c, s, vh_c @ q_a.T


def spectrum(delta: torch.Tensor, rank: int | None = None) -> Spectrum:
    """Spectrum and effective ranks of ``delta``; ``rank`` (the adapter's r) caps how many values exist."""
    _, s, _ = svd(delta)
    if rank is not None:
        s = s[:rank]
    return spectrum_of_values(s)


def spectrum_of_values(s: torch.Tensor) -> Spectrum:
    """Effective ranks from singular values (largest first)."""
    s = s.to(torch.float64).clamp_min(0)
    top = float(s[0]) if s.numel() else 0.0
    if top <= 0.0:
        return Spectrum([float(v) for v in s], 0, 0.0, 0, 0, 0.0)
    numerical = int((s > top * _RELATIVE_TOL).sum())
    # Numerical zeros (rounding noise of a low-rank product) must not count as directions.
    s = torch.where(s > top * _RELATIVE_TOL, s, torch.zeros_like(s))
    p = s / s.sum()
    nonzero = p[p > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    energy = (s**2).cumsum(0) / (s**2).sum()
    return Spectrum(
        singular_values=[float(v) for v in s],
        numerical_rank=numerical,
        entropy_rank=math.exp(entropy),
        energy_rank_90=_first_at_least(energy, 0.90),
        energy_rank_99=_first_at_least(energy, 0.99),
        frobenius_norm=float((s**2).sum().sqrt()),
    )


def _first_at_least(cumulative: torch.Tensor, level: float) -> int:
    # Small slack so that an exact 100% (rank-1 update) is never missed by rounding.
    hits = (cumulative >= level - 1e-12).nonzero()
    return int(hits[0]) + 1 if hits.numel() else int(cumulative.numel())


def directions(delta: torch.Tensor, rank: int | None = None, side: str = "right") -> torch.Tensor:
    """Orthonormal columns ``[d, k]`` spanning the update's top directions, best first.

    ``k`` is the update's numerical rank (at most ``rank``): directions with zero singular value are
    arbitrary and carry no update, so they are left out.
    """
    if side not in SIDES:
        raise UnsupportedError(f"unknown side {side!r}", f"use one of {', '.join(SIDES)}")
    u, s, vh = svd(delta)
    keep = spectrum_of_values(s if rank is None else s[:rank]).numerical_rank
    return u[:, :keep] if side == "left" else vh[:keep].T


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """The whole grid ``φ[i-1, j-1] = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j)`` for every ``i ≤ k1, j ≤ k2``.

    ``u1 [d, k1]`` and ``u2 [d, k2]`` hold orthonormal columns, best first. Computed in one pass: the
    squared overlaps ``(U1ᵀ U2)²`` summed over the leading ``i × j`` block are a 2-D cumulative sum.
    """
    if u1.shape[0] != u2.shape[0]:
        raise UnsupportedError(
            f"cannot compare subspaces of dimension {u1.shape[0]} and {u2.shape[0]}",
            "compare adapters of the same base and target module",
        )
    overlap = (u1.to(torch.float64).T @ u2.to(torch.float64)) ** 2  # [k1, k2]
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    # Rounding can push an exact 1 a hair above; φ is a fraction of min(i, j) unit vectors.
    return (cumulative / torch.minimum(i, j)).clamp(0.0, 1.0)


def similarity_summary(grid: torch.Tensor) -> dict[str, float]:
    """A few numbers from a φ grid: ``phi_1`` = φ(1, 1) (do the top directions agree?), ``phi_k`` = φ(k, k)
    for ``k`` the smaller subspace (how much of it the other's top-k covers), ``phi_mean`` over the grid."""
    if grid.numel() == 0:
        return {"phi_1": float("nan"), "phi_k": float("nan"), "phi_mean": float("nan"), "k": 0}
    k = min(grid.shape)
    return {"phi_1": float(grid[0, 0]), "phi_k": float(grid[k - 1, k - 1]), "phi_mean": float(grid.mean()),
            "k": k}


def random_baseline(d: int, i: int, j: int) -> float:
    """Expected φ(i, j) of two independent random subspaces of ``R^d``: ``max(i, j) / d`` (each of the
    ``min(i, j)`` vectors keeps on average ``max(i, j)/d`` of its squared norm in the other subspace)."""
    return min(1.0, max(i, j) / d)
