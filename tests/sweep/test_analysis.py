"""Invariants of the spectrum / effective-rank / subspace-similarity maths."""

from __future__ import annotations

import math

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.sweep.analysis import (
    directions,
    random_baseline,
    spectrum,
    spectrum_of_values,
    subspace_similarity,
)


def _low_rank(d_out: int, d_in: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_numerical_rank_and_energy_ranks_bound_the_true_rank(rank: int) -> None:
    s = spectrum(_low_rank(20, 16, rank, seed=rank))
    assert s.numerical_rank == rank
    assert 1 <= s.energy_rank_90 <= s.energy_rank_99 <= rank
    assert 1.0 - 1e-9 <= s.entropy_rank <= rank + 1e-9


def test_entropy_rank_of_flat_spectrum_is_its_length() -> None:
    for k in (1, 2, 5, 9):
        assert math.isclose(spectrum_of_values(torch.ones(k)).entropy_rank, k, rel_tol=1e-9)
        assert spectrum_of_values(torch.ones(k)).energy_rank_99 == k


def test_zero_update_has_rank_zero() -> None:
    s = spectrum(torch.zeros(5, 4))
    assert s.numerical_rank == 0 and s.entropy_rank == 0.0 and s.frobenius_norm == 0.0


def test_similarity_with_itself_is_one_everywhere() -> None:
    u = directions(_low_rank(24, 18, 6, seed=1))
    grid = subspace_similarity(u, u)
    assert grid.shape == (6, 6)
    assert torch.allclose(grid, torch.ones_like(grid), atol=1e-9)


def test_similarity_is_symmetric_under_swap_and_bounded() -> None:
    u1 = directions(_low_rank(30, 20, 5, seed=2))
    u2 = directions(_low_rank(30, 20, 8, seed=3))
    grid = subspace_similarity(u1, u2)
    assert grid.shape == (5, 8)
    assert torch.allclose(grid, subspace_similarity(u2, u1).T, atol=1e-12)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0


def test_orthogonal_subspaces_have_zero_similarity_and_nested_have_one() -> None:
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert float(subspace_similarity(q[:, :3], q[:, 3:7]).max()) < 1e-12
    # The first 3 directions lie inside the first 7: φ(i, j) = 1 wherever i ≤ 3 ≤ j.
    nested = subspace_similarity(q[:, :3], q[:, :7])
    assert torch.allclose(nested[:, 2:], torch.ones_like(nested[:, 2:]), atol=1e-12)


def test_random_subspaces_match_the_random_baseline_on_average() -> None:
    d, i, j = 64, 4, 8
    torch.manual_seed(0)
    values = []
    for _ in range(200):
        a, _ = torch.linalg.qr(torch.randn(d, i, dtype=torch.float64))
        b, _ = torch.linalg.qr(torch.randn(d, j, dtype=torch.float64))
        values.append(float(subspace_similarity(a, b)[-1, -1]))
    assert abs(sum(values) / len(values) - random_baseline(d, i, j)) < 0.03


def test_left_and_right_directions_live_in_output_and_input_space() -> None:
    delta = _low_rank(10, 6, 2, seed=4)
    assert directions(delta, side="left").shape == (10, 2)
    assert directions(delta, side="right").shape == (6, 2)
    with pytest.raises(UnsupportedError):
        directions(delta, side="up")


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(12, 20, 3), (20, 12, 5), (6, 8, 16)])
def test_factored_svd_matches_the_svd_of_the_product(d_out: int, d_in: int, rank: int) -> None:
    from adapterhub_local.lora import lora_delta
    from adapterhub_local.sweep.analysis import factored_svd, svd

    g = torch.Generator().manual_seed(rank)
    a, b = torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)
    u, s, vh = factored_svd(a, b, 0.5)
    _, s_full, _ = svd(lora_delta(a, b, 0.5))
    k = min(d_out, d_in, rank)
    assert s.shape == (k,) and u.shape == (d_out, k) and vh.shape == (k, d_in)
    assert torch.allclose(s, s_full[:k], rtol=1e-5, atol=1e-6)
    assert torch.allclose((u * s) @ vh, lora_delta(a, b, 0.5).double(), atol=1e-4)
    assert torch.allclose(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-9)
