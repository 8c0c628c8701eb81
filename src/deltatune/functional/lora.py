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

    The dropout mask is regenerated in backward from a saved RNG seed instead of being stored with a dropped copy
    of x: the LoRA branch then keeps no activation of the input's size of its own.
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
        g = grad_out * ctx.scale
        grad_h = g @ b
        grad_b = g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[2] else None
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            xd = _dropout(x, ctx.p, ctx.seed) if ctx.p > 0 else x
            grad_a = grad_h.reshape(-1, grad_h.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a
            if ctx.p > 0:
                grad_x = _dropout(grad_x, ctx.p, ctx.seed)  # the same mask and 1/(1-p) factor: dropout is linear
        return grad_x, grad_a, grad_b, None, None, None


def _dropout(x: Tensor, p: float, seed: int) -> Tensor:
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    keep = torch.empty(x.shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p, generator=gen)
    return x * keep * (1.0 / (1.0 - p))


def lora_branch(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout: float, training: bool) -> Tensor:
    """s · B A dropout(x) for a linear layer (x: (..., d_in) -> (..., d_out)), memory-lean in training."""
    if not training:
        dropout = 0.0
    if dropout == 0.0 and not torch.is_grad_enabled():
        return (x @ lora_a.T @ lora_b.T) * scale
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    return _LoraBranch.apply(x, lora_a, lora_b, scale, dropout, seed)
