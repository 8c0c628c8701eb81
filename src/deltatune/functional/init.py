"""Initialisations of adapter weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError


@torch.no_grad()
def kaiming_a_zero_b(lora_a: Tensor, lora_b: Tensor) -> None:
    """LoRA's default: A ~ kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(fan_in), as nn.Linear), B = 0: ΔW = 0 at start."""
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    nn.init.zeros_(lora_b)


@torch.no_grad()
def gaussian_a_zero_b(lora_a: Tensor, lora_b: Tensor, r: int) -> None:
    """peft's "gaussian" init: A ~ N(0, 1/r), B = 0."""
    nn.init.normal_(lora_a, std=1.0 / r)
    nn.init.zeros_(lora_b)


@torch.no_grad()
def pissa_factors(weight: Tensor, r: int, scale: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA (Meng et al. 2024, arXiv:2404.02948, §3): with W = U S Vᵀ (weight (d_out, d_in), float32), the adapter
    takes W's r principal components: A = sqrt(S_r / s) V_rᵀ (r, d_in), B = U_r sqrt(S_r / s) (d_out, r), so that
    s·B A is W's best rank-r approximation and the base keeps the residual W - s·B A. `niter`: a randomized SVD
    (`torch.svd_lowrank`, that many subspace iterations) instead of the full one (peft's "pissa_niter_N")."""
    if niter is None:
        u, s_values, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s_values, vh = u[:, :r], s_values[:r], vh[:r]
    else:
        u, s_values, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = (s_values / scale).sqrt()
    return root[:, None] * vh, u * root[None, :]


@torch.no_grad()
def mica_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """MiCA (arXiv:2604.01694): with W = U S Vᵀ (weight (d_out, d_in), float32), B = the r left singular vectors of the
    smallest singular values, U[:, -r:] (d_out, r), kept fixed; A = 0 (r, d_in) is what trains, so the update starts
    at zero and moves only within W's minor output directions. Needs r <= min(d_out, d_in)."""
    if r > min(weight.shape):
        raise ValueError(f"MiCA needs r <= min(d_out, d_in) = {min(weight.shape)}, got r={r}")
    u, _, _ = torch.linalg.svd(weight, full_matrices=False)
    return weight.new_zeros(r, weight.shape[1]), u[:, -r:].contiguous()


@torch.no_grad()
def olora_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W = Q R (weight (d_out, d_in), float32); A = R[:r] (r, d_in),
    B = Q[:, :r] (d_out, r): orthonormal columns in B; the base keeps W - s·B A."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()


@torch.no_grad()
def orthogonal_factors(d_in: int, d_out: int, r: int) -> tuple[Tensor, Tensor]:
    """peft's "orthogonal" init (even r): Q from the QR of an (r, r) Gaussian; A uses Q's even-indexed rows, B its
    odd ones, each against a Gaussian, /10. Rows of Q are orthonormal, so B A = 0 while neither factor is zero."""
    if r % 2:
        raise ConfigError(f'init_lora_weights="orthogonal" needs an even rank, got r={r}; use an even r.')
    q, _ = torch.linalg.qr(torch.randn(r, r))
    lora_a = (torch.randn(d_in, r // 2) @ q[0::2]).T / 10.0
    lora_b = (torch.randn(r // 2, d_out).T @ q[1::2]) / 10.0
    return lora_a.contiguous(), lora_b.contiguous()


@torch.no_grad()
def loftq_factors(
    weight: Tensor, r: int, num_iter: int, quantize: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ (Li et al. 2023, arXiv:2310.08659, Alg. 1): alternately quantize what the adapter does not hold,
    Q_t = quantize(W - B_{t-1} A_{t-1}) (B_0 A_0 = 0), and fit the adapter to what the quantization lost,
    (B_t, A_t) = SVD_r(W - Q_t) with A = sqrt(S_r) V_rᵀ, B = U_r sqrt(S_r). Returns (Q_T, A_T, B_T): the base takes Q_T
    (dequantized), so Q_T + B A approximates W better than Q alone. `quantize` maps a weight to its dequantized
    4-bit value. Unscaled, as peft: with lora_alpha = r (s = 1) the model starts at Q_T + B A."""
    target = weight
    for _ in range(num_iter):
        quantized = quantize(target)
        u, s_values, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = s_values[:r].sqrt()
        lora_a, lora_b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        target = weight - lora_b @ lora_a
    return quantized, lora_a, lora_b
