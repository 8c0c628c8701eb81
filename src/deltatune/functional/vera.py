"""VeRA math (Kopiczko et al. 2024, arXiv:2310.11454, §3): ΔW = Λ_b B Λ_d A with frozen random A, B shared by all
layers and trainable diagonal scalings λ_d (r,) and λ_b (d_out,).

    h = W0 x + λ_b ⊙ (B (λ_d ⊙ (A x)))       trainable params per layer: r + d_out
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def vera_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    """(A (r, max_in), B (max_out, r)) drawn from a CPU generator seeded with `seed`: A first, then B, each
    uniform(±sqrt(6 / fan_in)) with fan_in = size(1) (kaiming-uniform, gain sqrt(2)), so the same seed always gives
    the same projections (peft's `projection_prng_key` convention)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a, b = torch.empty(r, max_in), torch.empty(max_out, r)
    for t in (a, b):
        bound = math.sqrt(6.0 / t.shape[1])
        t.uniform_(-bound, bound, generator=gen)
    return a, b


def vera_delta(a: Tensor, b: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """ΔW = diag(λ_b) B diag(λ_d) A as (d_out, d_in); a, b already sliced to the layer's size."""
    return (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
