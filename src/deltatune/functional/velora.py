"""VeLoRA (Miles et al. 2024, arXiv:2405.17991): rank-1 sub-token compression of the activations LoRA's down-
projection keeps for its weight gradient.

Each token's input x (d_in) is cut into `num_groups` sub-tokens of ceil(d_in / num_groups) features (the last one
zero-padded); every sub-token s is kept only as its coefficient z = <s, v> on one unit vector v (the projection,
shared by all sub-tokens of the layer). In backward the input is rebuilt as z·v (times `scale`) and the gradient of A
is computed from it: grad_A ≈ grad_h^T · x̂. The forward, the gradient of B and the gradient reaching x are exact; A's
gradient is exact whenever every sub-token is parallel to v. Memory kept per token: num_groups numbers instead of d_in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deltatune.functional.lora import dropout_keep_mask, dropout_seed


def group_width(d_in: int, num_groups: int) -> int:
    """Features per sub-token: ceil(d_in / num_groups) (the projection's length)."""
    return -(-d_in // num_groups)


def sub_tokens(x: Tensor, num_groups: int) -> Tensor:
    """x (..., d_in) as (tokens, num_groups, width), the last group zero-padded to the common width."""
    width = group_width(x.shape[-1], num_groups)
    pad = num_groups * width - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(-1, num_groups, width)


def unit_projection(vector: Tensor) -> Tensor:
    """`vector` scaled to unit length (float32); a zero vector becomes the normalised all-ones one."""
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    if norm == 0:
        return torch.full_like(vector, vector.numel() ** -0.5)
    return vector / norm


def batch_average_projection(x: Tensor, num_groups: int) -> Tensor:
    """The paper's initialisation: the unit-length mean of all of the batch's sub-tokens."""
    return unit_projection(sub_tokens(x.detach(), num_groups).mean(dim=(0, 1)))


def compress(x: Tensor, projection: Tensor, num_groups: int) -> Tensor:
    """Coefficients z (tokens, num_groups) of every sub-token of x on `projection`."""
    return sub_tokens(x, num_groups) @ projection.to(x.dtype)


def reconstruct(z: Tensor, projection: Tensor, d_in: int, scale: float = 1.0) -> Tensor:
    """x̂ (tokens, d_in) = scale · z·v per sub-token, the padding cut off."""
    rebuilt = (z.unsqueeze(-1) * projection.to(z.dtype)).reshape(z.shape[0], -1)
    return rebuilt[:, :d_in] * scale


class _VeloraDown(torch.autograd.Function):
    """h = dropout(x) A^T (no 1/(1-p): the up-projection applies it), keeping for backward only the compressed
    coefficients of dropout(x), A, the projection and the dropout seed (the mask is regenerated, as in `lora_down`).
    With `refit` the projection is first taken from dropout(x) (`batch_average_projection`); the one used is
    returned as a second, non-differentiable output."""

    @staticmethod
    def forward(
        ctx, x: Tensor, a: Tensor, projection: Tensor, num_groups: int, scale: float, p: float, seed: int, refit: bool
    ) -> tuple[Tensor, Tensor]:
        xd = x * dropout_keep_mask(x.shape, p, seed, x.device, x.dtype) if p > 0 else x
        if refit:
            projection = batch_average_projection(xd, num_groups).to(projection.dtype)
        else:
            projection = projection.clone()  # the caller's may change before this backward runs
        ctx.save_for_backward(compress(xd, projection, num_groups), a, projection)
        ctx.shape, ctx.scale, ctx.p, ctx.seed = x.shape, scale, p, seed
        ctx.mark_non_differentiable(projection)
        return xd @ a.T, projection

    @staticmethod
    def backward(ctx, grad_h: Tensor, _grad_projection: Tensor | None):
        z, a, projection = ctx.saved_tensors
        grad_h = grad_h.to(z.dtype)
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            rebuilt = reconstruct(z, projection, ctx.shape[-1], ctx.scale)
            grad_a = (grad_h.reshape(-1, grad_h.shape[-1]).T @ rebuilt).to(a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a.to(grad_h.dtype)
            if ctx.p > 0:
                grad_x.mul_(dropout_keep_mask(ctx.shape, ctx.p, ctx.seed, grad_x.device, grad_x.dtype))
        return grad_x, grad_a, None, None, None, None, None, None


def velora_down(
    x: Tensor, lora_a: Tensor, projection: Tensor, num_groups: int, scale: float, dropout: float, refit: bool = False
) -> tuple[Tensor, Tensor]:
    """(dropout(x) A^T with VeLoRA's compressed backward, the projection used): pair the first with `lora_up`, which
    applies 1/(1-p); with `refit` the projection is taken from this batch (the caller stores it)."""
    return _VeloraDown.apply(x, lora_a, projection, num_groups, scale, dropout, dropout_seed(dropout), refit)
