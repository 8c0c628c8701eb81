"""What an adapter learned, from its weight change ΔW (Hu et al. 2021, arXiv:2106.09685, §7).

effective rank        exp(H(p)), p_i = σ_i / Σσ  (Roy & Vetterli 2007: 1 for one direction, k for k equal ones)
relative norm         ‖ΔW‖_F / ‖W‖_F
amplification         ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F, U, Vᵀ the top-r left / right singular vectors of ΔW (§7.3: how much
                      ΔW amplifies directions that W itself barely uses)
subspace similarity   φ(A, B, i, j) = ‖Aᵢᵀ Bⱼ‖_F² / min(i, j), Aᵢ, Bⱼ the first i / j columns of two orthonormal
                      bases (§7.2: 1 when one subspace contains the other, 0 when orthogonal)
"""

from __future__ import annotations

import torch
from torch import Tensor


def effective_rank(singular_values: Tensor) -> float:
    """exp of the entropy of the normalized singular values (0 for a zero matrix)."""
    s = singular_values.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(singular_values: Tensor, rtol: float = 1e-5) -> int:
    """Singular values above rtol times the largest."""
    if singular_values.numel() == 0 or singular_values.max() <= 0:
        return 0
    return int((singular_values > rtol * singular_values.max()).sum())


def amplification(delta: Tensor, weight: Tensor, r: int | None = None) -> float:
    """‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F with U (d_out, r), Vᵀ (r, d_in) from ΔW's SVD (r: ΔW's numerical rank by default)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = r or max(1, numerical_rank(s))
    projected = u[:, :r].T @ weight.double() @ vh[:r].T
    return float(torch.linalg.matrix_norm(delta.double()) / torch.linalg.matrix_norm(projected))


def subspace_similarity(a: Tensor, b: Tensor, i: int, j: int) -> float:
    """φ(a, b, i, j) for bases a (d, ≥i) and b (d, ≥j) with orthonormal columns."""
    overlap = a[:, :i].double().T @ b[:, :j].double()
    return float(overlap.pow(2).sum() / min(i, j))


def similarity_grid(a: Tensor, b: Tensor) -> Tensor:
    """φ(a, b, i, j) for every i <= a's columns and j <= b's columns, as a (i, j) grid (1-based i, j at [i-1, j-1])."""
    overlap = (a.double().T @ b.double()).pow(2)  # (ka, kb): squared cosines between basis vectors
    cumulative = overlap.cumsum(0).cumsum(1)
    ii = torch.arange(1, a.shape[1] + 1, dtype=torch.float64)[:, None]
    jj = torch.arange(1, b.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(ii, jj)


def input_subspace(delta: Tensor, k: int | None = None) -> Tensor:
    """The top-k right singular vectors of ΔW as columns (d_in, k): the input directions the change acts on (for
    LoRA, the row space of A, which the paper compares)."""
    _, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = k or max(1, numerical_rank(s))
    return vh[:k].T
