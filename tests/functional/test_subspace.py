"""ΔW analysis math against hand computations (LoRA paper §7)."""

from __future__ import annotations

import torch

from deltatune.functional.subspace import (
    amplification,
    effective_rank,
    input_subspace,
    numerical_rank,
    similarity_grid,
    subspace_similarity,
)

G = torch.Generator().manual_seed(0)


def _orthonormal(d: int, k: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=G, dtype=torch.float64)).Q


def test_subspace_similarity_bounds_symmetry_and_direct_computation():
    a, b = _orthonormal(12, 5), _orthonormal(12, 4)
    assert abs(subspace_similarity(a, a, 5, 5) - 1) < 1e-12
    assert abs(subspace_similarity(a, a[:, :2], 5, 2) - 1) < 1e-12  # one contains the other
    eye = torch.eye(12, dtype=torch.float64)
    assert subspace_similarity(eye[:, :3], eye[:, 3:7], 3, 4) == 0.0
    for i, j in [(1, 1), (3, 2), (5, 4)]:
        # direct: ‖Aᵢᵀ Bⱼ‖_F² = trace(Pᵢ Qⱼ) with the projections Pᵢ = Aᵢ Aᵢᵀ, Qⱼ = Bⱼ Bⱼᵀ
        p, q = a[:, :i] @ a[:, :i].T, b[:, :j] @ b[:, :j].T
        assert abs(subspace_similarity(a, b, i, j) - float(torch.trace(p @ q)) / min(i, j)) < 1e-12
        assert abs(subspace_similarity(a, b, i, j) - subspace_similarity(b, a, j, i)) < 1e-12
    grid = similarity_grid(a, b)
    assert grid.shape == (5, 4)
    for i in range(1, 6):
        for j in range(1, 5):
            assert abs(float(grid[i - 1, j - 1]) - subspace_similarity(a, b, i, j)) < 1e-12


def test_amplification_against_a_hand_computation():
    """W = diag(10, 1, 0.1); ΔW = 2 e₃e₃ᵀ acts only where W is weakest: UᵀWVᵀ = 0.1, so the factor is 2 / 0.1."""
    w = torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[2, 2] = 2.0
    assert abs(amplification(delta, w) - 20.0) < 1e-9
    delta_strong = torch.zeros(3, 3, dtype=torch.float64)
    delta_strong[0, 0] = 2.0  # along W's strongest direction: 2 / 10
    assert abs(amplification(delta_strong, w) - 0.2) < 1e-9


def test_effective_and_numerical_rank():
    assert abs(effective_rank(torch.ones(4)) - 4) < 1e-12  # four equal directions
    assert abs(effective_rank(torch.tensor([3.0, 0, 0])) - 1) < 1e-12
    low = _orthonormal(10, 3) @ torch.randn(3, 8, generator=G, dtype=torch.float64)
    s = torch.linalg.svdvals(low)
    assert numerical_rank(s) == 3 and 1 < effective_rank(s) <= 3
    basis = input_subspace(low)
    assert basis.shape == (8, 3)  # the row space of a rank-3 change
    torch.testing.assert_close(basis @ basis.T @ low.T, low.T)  # it spans ΔW's rows
