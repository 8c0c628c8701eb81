"""LoRA math (Hu et al. 2021, arXiv:2106.09685, §4.1): h = W0 x + s · B A x, with s = alpha / r.

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses s = alpha / sqrt(r).
A is (r, d_in), B is (d_out, r); trainable parameters per adapted d_in -> d_out matrix: r · (d_in + d_out).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s in W0 + s·BA: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(lora_a: Tensor, lora_b: Tensor, scale: float, fan_in_fan_out: bool = False) -> Tensor:
    """ΔW = s · B A, shaped like the base weight: (d_out, d_in), or (d_in, d_out) when `fan_in_fan_out` (GPT-2 Conv1D).

    For convolutions A is (r, d_in, *kernel) and B is (d_out, r, 1, ...): ΔW[o, i, ...] = s · Σ_r B[o, r] A[r, i, ...].
    """
    if lora_a.dim() > 2:
        flat = lora_b.flatten(1) @ lora_a.flatten(1)
        return (scale * flat).reshape(lora_b.shape[0], *lora_a.shape[1:])
    delta = scale * (lora_b @ lora_a)
    return delta.T if fan_in_fan_out else delta


def embedding_lora_delta(lora_embedding_a: Tensor, lora_embedding_b: Tensor, scale: float) -> Tensor:
    """ΔE = s · (B A)^T for an embedding table (num_embeddings, dim); A is (r, num_embeddings), B is (dim, r)."""
    return scale * (lora_embedding_b @ lora_embedding_a).T


class _LoraBranch(torch.autograd.Function):
    """y = s · dropout(x) A^T B^T, saving only x (already alive for the base layer), A, B and the small x A^T.

    The dropout mask is regenerated in backward from a saved seed (a counter-based hash, `dropout_keep_mask`)
    instead of being stored with a dropped copy of x: the LoRA branch then keeps no activation of x's size of its own.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float, seed: int) -> Tensor:
        xd = _dropout(x, p, seed) if p > 0 else x
        h = xd @ a.T
        ctx.save_for_backward(x, a, b, h)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return (h @ b.T) * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, a, b, h = ctx.saved_tensors
        p, need_x, need_a, need_b = ctx.p, *ctx.needs_input_grad[:3]
        g = grad_out * ctx.scale
        grad_h = g @ b
        grad_b = g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1]) if need_b else None
        keep = dropout_keep_mask(x.shape, p, ctx.seed, x.device) if p > 0 and (need_a or need_x) else None
        grad_a = grad_x = None
        if need_a:
            xd = _apply_mask(x, keep, p) if keep is not None else x
            grad_a = grad_h.reshape(-1, grad_h.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])
        if need_x:
            grad_x = grad_h @ a
            if keep is not None:  # dropout is linear: the same mask and 1/(1-p) factor
                grad_x = _apply_mask(grad_x, keep, p)
        return grad_x, grad_a, grad_b, None, None, None


_GOLDEN, _MIX1, _MIX2 = -1640531527, -2048144789, -1028477387  # 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35 as int32


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """Bernoulli(1 - p) keep-mask that is a pure function of (shape, p, seed): murmur3's 32-bit finalizer over
    element indices. Several times cheaper than torch's CPU generator, identical on every device, and cheap to
    recompute in backward, so the mask never has to be stored.
    """
    n = math.prod(shape)
    seed = (seed * 0x9E3779B97F4A7C15 >> 32) & 0xFFFFFFFF  # spread the seed's bits before offsetting the counter
    h = torch.arange(n, dtype=torch.int32, device=device) * _GOLDEN + (seed - (1 << 31))  # int32 wraps around
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MIX1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _MIX2
    h = h ^ ((h >> 16) & 0xFFFF)  # ~uniform over int32
    return (h >= int(p * 2**32) - 2**31).view(shape)


def _apply_mask(x: Tensor, keep: Tensor, p: float) -> Tensor:
    return x.masked_fill(~keep, 0.0) * (1.0 / (1.0 - p))


def _dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """Inverted dropout with the hash mask of `seed`."""
    return _apply_mask(x, dropout_keep_mask(x.shape, p, seed, x.device), p)


def lora_branch(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout: float, training: bool) -> Tensor:
    """s · B A dropout(x) for a linear layer (x: (..., d_in) -> (..., d_out)), memory-lean in training."""
    if not training:
        dropout = 0.0
    if dropout == 0.0 and not torch.is_grad_enabled():
        return (x @ lora_a.T @ lora_b.T) * scale
    seed = int(torch.randint(0, 2**31, (1,)).item()) if dropout > 0 else 0  # from the global RNG: reproducible
    return _LoraBranch.apply(x, lora_a, lora_b, scale, dropout, seed)
