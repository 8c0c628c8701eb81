"""DoRA math (Liu et al. 2024, arXiv:2402.09353, §4): W' = m · (W0 + ΔW) / ‖W0 + ΔW‖_c.

‖·‖_c is the L2 norm of each output feature's weights (a row of the (out, in) matrix, as peft computes it); m has one
entry per output feature and starts at ‖W0‖_c. The norm is treated as a constant in backward (§4.3).
"""

from __future__ import annotations

from torch import Tensor


def column_norm(weight: Tensor) -> Tensor:
    """‖W‖_c: one L2 norm per output feature (dim 0), over all other dims (conv kernels included)."""
    return weight.flatten(1).norm(dim=1)


def dora_merge(weight: Tensor, delta: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """(W', norm): W' = m / ‖W + ΔW‖_c · (W + ΔW); the norm is returned so the merge can be undone exactly."""
    combined = weight + delta
    norm = column_norm(combined)
    return _scale_rows(combined, magnitude / norm), norm


def dora_unmerge(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """W = W' · ‖W + ΔW‖_c / m − ΔW, with the norm cached at merge time."""
    return _scale_rows(merged, norm / magnitude) - delta


def _scale_rows(weight: Tensor, factor: Tensor) -> Tensor:
    return weight * factor.view(-1, *([1] * (weight.dim() - 1)))
