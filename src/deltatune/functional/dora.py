"""DoRA math (Liu et al. 2024, arXiv:2402.09353, §4): W' = m · (W0 + ΔW) / ‖W0 + ΔW‖_c.

‖·‖_c is the L2 norm of each output feature's weights (a row of the (out, in) matrix, as peft computes it); m has one
entry per output feature and starts at ‖W0‖_c. The norm is treated as a constant in backward (§4.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltatune.functional.lora import dropout_keep_mask, dropout_seed


def column_norm(weight: Tensor) -> Tensor:
    """‖W‖_c: one L2 norm per output feature (dim 0), over all other dims (conv kernels included)."""
    return weight.flatten(1).norm(dim=1)


def dora_merge(weight: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(W', norm): W' = m / ‖W + ΔW‖_c · (W + ΔW); the norm is returned so the merge can be undone exactly. A given
    `norm` is used instead of ‖W + ΔW‖_c: merging onto a weight that already holds other adapters, the norm is the
    unmerged base's, ‖W0 + ΔW‖_c, as the forward computes it."""
    combined = weight + delta
    norm = column_norm(combined) if norm is None else norm
    return _scale_rows(combined, magnitude / norm), norm


def dora_unmerge(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """W = W' · ‖W + ΔW‖_c / m − ΔW, with the norm cached at merge time."""
    return _scale_rows(merged, norm / magnitude) - delta


def _scale_rows(weight: Tensor, factor: Tensor) -> Tensor:
    return weight * factor.view(-1, *([1] * (weight.dim() - 1)))


class _DoraLinear(torch.autograd.Function):
    """y = result + (k - 1)·base + k·v, k = m / norm (norm constant), v = s·(x_d Aᵀ) Bᵀ, base = the base layer's
    output without bias (`result - bias`), or, with dropout p > 0, `x_d Wᵀ` on the dropped input x_d (peft's form).
    Autograd's version saves base and v (two (tokens x d_out) tensors), plus the dropped input and its mask; the
    magnitude's gradient only needs base + v, which this one keeps: without dropout as the output itself
    (base + v = (y - bias) / k; the next op usually holds y anyway), with dropout as one tensor. The dropout mask is
    the LoRA branch's counter hash (`dropout_keep_mask`), regenerated in backward from its seed rather than stored."""

    @staticmethod
    def forward(ctx, x, result, a, b, magnitude, norm, scaling, bias, weight, p, seed):
        k = (magnitude / norm).to(x.dtype)
        xd = x * dropout_keep_mask(x.shape, p, seed, x.device, x.dtype) * (1.0 / (1.0 - p)) if p > 0 else x
        u = xd @ a.to(x.dtype).T
        v = (u @ b.to(x.dtype).T) * scaling
        if p == 0:  # base = result - bias: y = bias + k·(base + v)
            base = result if bias is None else result - bias
            y = (k * (base + v)).to(result.dtype)
            y = y if bias is None else y + bias
            ctx.save_for_backward(x, u, a, b, magnitude, norm, y, bias)
        else:
            base = xd @ weight.to(x.dtype).T
            y = result + ((k - 1) * base + k * v).to(result.dtype)
            ctx.save_for_backward(x, u, a, b, magnitude, norm, base.add_(v), weight)
        ctx.scaling, ctx.p, ctx.seed, ctx.result_dtype = scaling, p, seed, result.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, u, a, b, magnitude, norm, kept, extra = ctx.saved_tensors
        k = (magnitude / norm).to(x.dtype)
        g = g.to(x.dtype)
        z = kept if ctx.p > 0 else ((kept if extra is None else kept - extra) / k).to(x.dtype)
        grad_m = (g * z).flatten(0, -2).sum(0) / norm
        gv = (g * k) * ctx.scaling
        grad_u = gv @ b.to(x.dtype)
        grad_b = gv.flatten(0, -2).T @ u.flatten(0, -2)
        grad_bias = None
        if ctx.p > 0:
            keep = dropout_keep_mask(x.shape, ctx.p, ctx.seed, x.device, x.dtype)
            inverse = 1.0 / (1.0 - ctx.p)
            grad_a = grad_u.flatten(0, -2).T @ (x * keep * inverse).flatten(0, -2)
            grad_x = (grad_u @ a.to(x.dtype) + (g * (k - 1)) @ extra.to(x.dtype)).mul_(keep).mul_(inverse)
            grad_result = g
        else:
            grad_a = grad_u.flatten(0, -2).T @ x.flatten(0, -2)
            grad_x = grad_u @ a.to(x.dtype)
            grad_result = g * k
            if ctx.needs_input_grad[7]:  # a trained base bias: y depends on it once through result, once directly
                grad_bias = -(g * (k - 1)).flatten(0, -2).sum(0).to(extra.dtype)
        return (grad_x, grad_result.to(ctx.result_dtype), grad_a.to(a.dtype), grad_b.to(b.dtype),
                grad_m.to(magnitude.dtype), None, None, grad_bias, None, None, None)  # fmt: skip


def dora_linear(
    x: Tensor,
    result: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    weight: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """A DoRA linear layer's output from the base layer's `result` (its output for `x`, bias included), saving less
    for backward than the plain expression (`_DoraLinear`). `norm` = ‖W0 + s·B A‖_c, a constant; `bias`: the base
    layer's; with `dropout` > 0 the base term is recomputed on the dropped input with `weight` (d_out, d_in), as peft
    does. The dropout seed comes from torch's global generator (reproducible under `torch.manual_seed`)."""
    if dropout > 0 and weight is None:
        raise ValueError("dora_linear with dropout needs the base weight (d_out, d_in) for the base term.")
    seed = dropout_seed(dropout)
    return _DoraLinear.apply(x, result, lora_a, lora_b, magnitude, norm.detach(), scaling, bias, weight, dropout, seed)
