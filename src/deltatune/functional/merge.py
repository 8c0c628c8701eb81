"""Combining task tensors (weight changes, or adapter factors) into one: the merge rules of model-merging papers.

    magnitude_prune   keep the ⌊density·n⌋ largest-|x| entries of each tensor, then Σ wᵢ tᵢ
    dare_linear       DARE (Yu et al. 2024, arXiv:2311.03099): keep each entry with probability `density`, scale the
                      kept ones by 1/density, then Σ wᵢ tᵢ
    ties              TIES (Yadav et al. 2023, arXiv:2306.01708): trim (magnitude prune), elect a sign per entry
                      (sign of Σ tᵢ, "total", or of Σ sign(tᵢ), "frequency"), then the mean of the weighted entries
                      that agree with it (disjoint merge)
    dare_ties         DARE's random trim, then TIES' election and disjoint merge
All take tensors of one shape and per-tensor weights; `generator` makes DARE's masks reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_mask(t: Tensor, density: float) -> Tensor:
    """True for the ⌊density·n⌋ entries of largest magnitude."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k:
        mask[t.abs().flatten().topk(k).indices] = True
    return mask.view_as(t)


def random_mask(t: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Each entry kept with probability `density`."""
    return torch.rand(t.shape, generator=generator, device="cpu").to(t.device) < density


def magnitude_prune(tensors: list[Tensor], weights: list[float], density: float) -> Tensor:
    return sum(w * t * magnitude_mask(t, density) for t, w in zip(tensors, weights, strict=True))


def dare_linear(tensors: list[Tensor], weights: list[float], density: float,
                generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    return sum(w * _dare(t, density, generator) for t, w in zip(tensors, weights, strict=True))


def _dare(t: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    return t * random_mask(t, density, generator) / density


def elected_sign(trimmed: Tensor, method: str = "total") -> Tensor:
    """Per entry +1 or -1 over the stacked tensors (dim 0): the sign of their sum ("total") or of the sum of their
    signs ("frequency"); a zero sum elects +1."""
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}.")
    votes = trimmed.sum(0) if method == "total" else trimmed.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)


def disjoint_merge(trimmed: Tensor, weights: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tensors whose entry agrees with the elected sign (zero entries never count), of the weighted
    entries."""
    agrees = (trimmed.sign() == sign) & (trimmed != 0)
    weighted = trimmed * weights.view(-1, *([1] * (trimmed.dim() - 1)))
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def ties(tensors: list[Tensor], weights: list[float], density: float, majority_sign_method: str = "total") -> Tensor:
    trimmed = torch.stack([t * magnitude_mask(t, density) for t in tensors])
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device)
    return disjoint_merge(trimmed, w, elected_sign(trimmed, majority_sign_method))


def dare_ties(tensors: list[Tensor], weights: list[float], density: float, majority_sign_method: str = "total",
              generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    trimmed = torch.stack([_dare(t, density, generator) for t in tensors])
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device)
    return disjoint_merge(trimmed, w, elected_sign(trimmed, majority_sign_method))
