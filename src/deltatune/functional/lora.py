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


class _LoraDown(torch.autograd.Function):
    """h = dropout(x) A^T (A: (R, d_in), possibly several modules' A stacked), saving only x (already alive for the
    base layer), A and the dropout seed.

    The dropout mask is regenerated in backward from the seed (a counter-based hash, `dropout_keep_mask`) instead
    of being stored with a dropped copy of x: the branch keeps no activation of x's size of its own. The mask is 0/1
    in x's dtype (multiplying by a bool mask costs a type promotion pass); inverted dropout's 1/(1-p) is left to
    the up-projection's scale, so every full-size tensor is touched once per pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, p: float, seed: int) -> Tensor:
        xd = x * dropout_keep_mask(x.shape, p, seed, x.device, x.dtype) if p > 0 else x
        ctx.save_for_backward(x, a)
        ctx.p, ctx.seed = p, seed
        return xd @ a.T

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        x, a = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]
        grad_h = _cast(grad_h, x.dtype)  # (..., R): under autocast it may arrive in the output's dtype
        keep = dropout_keep_mask(x.shape, ctx.p, ctx.seed, x.device, x.dtype) if ctx.p > 0 else None
        grad_a = grad_x = None
        if need_a:
            xd = x * keep if keep is not None else x
            grad_a = _cast(_flat(grad_h).T @ _flat(xd), a.dtype)
        if need_x:
            grad_x = grad_h @ _cast(a, x.dtype)
            if keep is not None:  # dropout is linear: the same mask
                grad_x.mul_(keep)
        return grad_x, grad_a, None, None


class _LoraUp(torch.autograd.Function):
    """y = s · h B^T for the small h = dropout(x) A^T; backward in the layouts the CPU BLAS runs fastest for thin
    matrices (B column-major; grad_B as (h^T g)^T rather than g^T h, about 2x faster each at r=8)."""

    @staticmethod
    def forward(ctx, h: Tensor, b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(h, b)
        ctx.scale = scale
        return (h * scale) @ b.T

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, b = ctx.saved_tensors
        s, out_dtype = ctx.scale, grad_out.dtype
        # Products with grad_out run in its dtype (bf16 under autocast); only the rank-r tensors are cast.
        grad_h = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_out @ _cast(b, out_dtype).T.contiguous().T).mul_(s)
        if ctx.needs_input_grad[1]:
            grad_b = _cast((_flat(_cast(h, out_dtype)).T @ _flat(grad_out)).T.mul_(s), b.dtype)
        return grad_h, grad_b, None


def lora_down(x: Tensor, lora_a: Tensor, dropout: float) -> Tensor:
    """dropout(x) A^T without the 1/(1-p) of inverted dropout (`lora_up` applies it), memory-lean in training;
    `lora_a` may stack several modules' A that read the same x (they then share one dropout mask)."""
    return _LoraDown.apply(x, lora_a, dropout, dropout_seed(dropout))


def dropout_seed(dropout: float) -> int:
    """A seed for `dropout_keep_mask`, drawn from the global RNG (so runs reproduce); 0 without dropout."""
    return int(torch.randint(0, 2**31, (1,)).item()) if dropout > 0 else 0


def lora_up(h: Tensor, lora_b: Tensor, scale: float, dropout: float) -> Tensor:
    """s · h B^T / (1 - p) for h from `lora_down` (or a slice of a stacked one)."""
    return _LoraUp.apply(h, lora_b, scale / (1.0 - dropout))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips the no-op call: backward runs once per layer per step


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


_GOLDEN, _MIX1, _MIX2 = -1640531527, -2048144789, -1028477387  # 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35 as int32


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device, dtype: torch.dtype = torch.bool
) -> Tensor:
    """Mask, True (1) where an element is kept (probability 1 - p, to 1/65536), a pure function of (shape, p, seed);
    in `dtype` (written directly by the comparison: a float mask multiplies ~4x faster than a bool one).

    murmur3's 32-bit finalizer hashes a counter; each 32-bit hash gives two 16-bit uniforms, i.e. two mask elements.
    About 6x cheaper than torch's CPU generator, the same on every device, and cheap to recompute in backward, so
    the mask never has to be stored.
    """
    n = math.prod(shape)
    seed = (seed * 0x9E3779B97F4A7C15 >> 32) & 0xFFFFFFFF  # spread the seed's bits before offsetting the counter
    h = torch.add(_golden_counter((n + 1) // 2, device), seed - (1 << 31))  # int32 arithmetic wraps around
    tmp = torch.empty_like(h)
    for shift, mult in ((16, _MIX1), (13, _MIX2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        h.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1))  # a logical shift: drop the sign extension
        if mult is not None:
            h.mul_(mult)
    uniform16 = h.view(torch.int16)[:n]  # ~uniform over [-32768, 32767]
    keep = torch.empty(n, dtype=dtype, device=device)
    return torch.ge(uniform16, round(p * 65536) - 32768, out=keep).view(shape)


_COUNTER_CACHE_MAX = 1 << 22  # int32 elements (16 MiB): larger masks recompute the counter (cheap beside their matmuls)
_golden_counters: dict[torch.device, Tensor] = {}


def _golden_counter(m: int, device: torch.device) -> Tensor:
    """[0, 1, ..., m-1] * 0x9E3779B9 in wrapping int32: the hash's input before the seed. A pure function of the
    position, so one tensor per device serves every shorter mask as a prefix; cached up to `_COUNTER_CACHE_MAX`
    (building it is 3 of the mask's ~12 passes)."""
    if m > _COUNTER_CACHE_MAX:
        return torch.arange(m, dtype=torch.int32, device=device).mul_(_GOLDEN)
    device = torch.device(device)
    cached = _golden_counters.get(device)
    if cached is None or cached.numel() < m:
        size = min(_COUNTER_CACHE_MAX, max(m, 2 * (0 if cached is None else cached.numel())))
        cached = _golden_counters[device] = torch.arange(size, dtype=torch.int32, device=device).mul_(_GOLDEN)
    return cached[:m]


def _dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """Inverted dropout with the hash mask of `seed` (reference for tests and non-fused paths)."""
    return x * dropout_keep_mask(x.shape, p, seed, x.device, x.dtype) * (1.0 / (1.0 - p))


def lora_branch(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout: float, training: bool) -> Tensor:
    """s · B A dropout(x) for a linear layer (x: (..., d_in) -> (..., d_out)), memory-lean in training."""
    if not training:
        dropout = 0.0
    if dropout == 0.0 and not torch.is_grad_enabled():
        return (x @ lora_a.T @ lora_b.T) * scale
    return lora_up(lora_down(x, lora_a, dropout), lora_b, scale, dropout)


def relative_to_initial(lora_a: Tensor, lora_b: Tensor, initial_a: Tensor, initial_b: Tensor) -> tuple[Tensor, Tensor]:
    """A plain LoRA pair of twice the rank for B A - B0 A0 = [B | -B0] [A; A0]: what an adapter trained from a
    base-rewriting init (PiSSA, OLoRA: base W - s·B0 A0) adds to the original W. Works for every factor shape whose
    rank axis is A's first and B's second."""
    return torch.cat([lora_a, initial_a], dim=0), torch.cat([lora_b, -initial_b], dim=1)
