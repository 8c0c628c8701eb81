"""ReFT math (Wu et al. 2024, arXiv:2404.03592): low-rank interventions on hidden states at chosen positions.

    LoReFT  Φ(h) = h + Rᵀ(W h + b − R h)     R (r, d) with orthonormal rows, W (r, d), b (r,)
    DiReFT  Φ(h) = h + W₂ᵀ(W₁ h + b)          W₁ (r, d), b (r,), W₂ (r, d), no orthogonality
    trainable per intervention: 2·d·r + r

Positions "f7+l7" are the first 7 and the last 7 prompt tokens; when the prompt has fewer than p + s tokens both
become ⌊n/2⌋ (the official code's rule), so no token gets two interventions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor


def loreft(h: Tensor, rotate: Tensor, source: Tensor, bias: Tensor, act: Callable[[Tensor], Tensor] = None) -> Tensor:
    """h + Rᵀ(act(W h + b) − R h) for rows h (..., d); rotate = R (r, d), source = W (r, d), bias = b (r,)."""
    learned = h @ source.T + bias
    if act is not None:
        learned = act(learned)
    return h + (learned - h @ rotate.T) @ rotate


def direft(h: Tensor, source: Tensor, bias: Tensor, project: Tensor, act: Callable[[Tensor], Tensor] = None) -> Tensor:
    """h + W₂ᵀ act(W₁ h + b); source = W₁ (r, d), bias = b (r,), project = W₂ (r, d)."""
    learned = h @ source.T + bias
    if act is not None:
        learned = act(learned)
    return h + learned @ project


def orthonormal_rows(x: Tensor) -> Tensor:
    """The matrix with orthonormal rows nearest in the QR sense to x (r, d), r <= d: Q of x's QR with the signs
    fixed so that an already orthonormal x maps to itself (a smooth, differentiable retraction)."""
    q, upper = torch.linalg.qr(x.T)  # x.T = q @ upper, q (d, r) with orthonormal columns
    signs = torch.sign(torch.diagonal(upper))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).T


def parse_positions(spec: str) -> tuple[int, int]:
    """ "f7+l7" -> (7, 7); "f5" -> (5, 0); "l3" -> (0, 3)."""
    match = re.fullmatch(r"(?:f(\d+))?\+?(?:l(\d+))?", spec.replace(" ", ""))
    if not spec or match is None or not (match.group(1) or match.group(2)):
        raise ValueError(f"positions {spec!r} is not of the form 'f<first>+l<last>' (e.g. 'f7+l7', 'f5', 'l3').")
    first, last = int(match.group(1) or 0), int(match.group(2) or 0)
    if first + last == 0:
        raise ValueError(f"positions {spec!r} selects no token.")
    return first, last


def position_masks(
    attention_mask: Tensor, prompt_lengths: Tensor | None, first: int, last: int
) -> tuple[Tensor, Tensor]:
    """(first-positions mask, last-positions mask), each (B, T) bool: per row, the prompt is its first
    `prompt_lengths[row]` attended tokens (all attended tokens when None; padding may be on either side)."""
    rows, width = attention_mask.shape
    first_mask = torch.zeros(rows, width, dtype=torch.bool, device=attention_mask.device)
    last_mask = torch.zeros_like(first_mask)
    for row in range(rows):
        attended = attention_mask[row].nonzero().flatten()
        n = len(attended) if prompt_lengths is None else min(int(prompt_lengths[row]), len(attended))
        prompt = attended[:n]
        f, s = first, last
        if f and s and n < f + s:
            f = s = n // 2
        f, s = min(f, n), min(s, n)
        first_mask[row, prompt[:f]] = True
        if s:
            last_mask[row, prompt[n - s :]] = True
    return first_mask, last_mask
