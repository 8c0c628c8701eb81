"""Blockwise 4-bit quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, §3): NF4 and FP4 codebooks,
absmax per block, two values packed per byte, and double quantization of the absmax constants.

    w ≈ code[q] · absmax[block]          (q: 4-bit index of the nearest code value to w / absmax)

Storage per parameter: 4 bits + 32/blocksize bits for fp32 absmax (0.5 bit at blocksize 64). Double quantization
stores absmax - mean(absmax) in 8 bits, blockwise with one fp32 absmax per 256 constants, on the signed 8-bit
dynamic code (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", §2.2: a sign, a run of zero bits
for the decade, a linear fraction): 8/64 + 32/(64·256) ≈ 0.127 bit. That is bitsandbytes' scheme, byte for byte
(its CPU encoder's binning included), so its serialized 4-bit checkpoints load here and ours load there.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# The 16 NormalFloat values (QLoRA appendix; bit-for-bit bitsandbytes' table), index order 0..15.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit), normalised to max 1: bitsandbytes' index order (bit 3 = sign).
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
NESTED_BLOCK = 256


def codebook(quant_type: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16 code values as a float32 tensor on `device`; cached (read-only: never modify it), so a forward on a GPU
    does not copy it from the host for every layer."""
    return _codebook(quant_type, torch.device(device))


@functools.cache
def _codebook(quant_type: str, device: torch.device) -> Tensor:
    return torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)


def _nearest_index(normalized: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest code value for each element (ties go to the smaller value), without an (n, 16) temp."""
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[1:] + sorted_code[:-1]) / 2
    return order[torch.bucketize(normalized, midpoints, right=False)].to(torch.uint8)


def pack_nibbles(idx: Tensor) -> Tensor:
    """Two 4-bit indices per byte, the first (even) element in the high nibble; odd lengths are zero-padded."""
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    pairs = idx.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).flatten()[:n]


def quantize_blockwise_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """(packed uint8 of ceil(n/2) bytes, fp32 absmax per block) of the flattened tensor."""
    if not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]
    idx = _nearest_index(normalized.reshape(-1)[:n], codebook(quant_type, w.device))
    return pack_nibbles(idx), absmax


_PAIR_TABLES: dict[tuple[str, str], Tensor] = {}


def _pair_table(quant_type: str, device: torch.device) -> Tensor:
    """byte -> (code[high nibble], code[low nibble]) as one int64 per byte (two float32 side by side), so
    dequantization is a single gather of 8-byte words instead of unpack + two lookups."""
    key = (quant_type, str(device))
    if key not in _PAIR_TABLES:
        code = codebook(quant_type, device)
        pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
        _PAIR_TABLES[key] = pairs.view(torch.int64).view(-1)
    return _PAIR_TABLES[key]


def dequantize_blockwise_4bit(
    packed: Tensor,
    absmax: Tensor,
    shape: torch.Size | tuple[int, ...],
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """code[q] · absmax[block], reshaped to `shape`, in `dtype`."""
    n = math.prod(shape)
    values = torch.take(_pair_table(quant_type, packed.device), packed.long()).view(torch.float32)
    pad = (-n) % blocksize
    values = values[:n] if pad == 0 else torch.cat([values[:n], values.new_zeros(pad)])
    values = values.view(-1, blocksize) * absmax[:, None]
    return values.reshape(-1)[:n].view(shape).to(dtype)


def dynamic_code_8bit(device: torch.device | str = "cpu") -> Tensor:
    """The 256 values of the signed 8-bit dynamic code, ascending: 0, 1, and for each decade 10^(k-6), k = 0..6, the
    2^k midpoints of 2^k equal steps from 0.1 to 1 times 10^(k-6), with both signs (2·127 + 2 = 256 values)."""
    return _dynamic_code(torch.device(device))


@functools.cache
def _dynamic_code(device: torch.device) -> Tensor:
    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        scaled = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)  # float32 arithmetic, as bitsandbytes' table
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _blocks_of(values: Tensor, size: int) -> Tensor:
    pad = (-values.numel()) % size
    return torch.cat([values, values.new_zeros(pad)]).view(-1, size)


LUT_BINS = 65536


@functools.cache
def _dynamic_lut(device: torch.device) -> Tensor:
    """Code index for each of LUT_BINS equal bins of [-1, 1]: the nearest code value to the bin's value (midpoints
    of neighbours decide, the smaller on a tie), all in float32."""
    code = dynamic_code_8bit(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32, device=device)) / (LUT_BINS - 1)
    return torch.searchsorted(midpoints, bins, side="left").to(torch.uint8)


def double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """absmax (fp32) -> (uint8 indices into the dynamic code, fp32 absmax per 256 constants, fp32 offset = mean).

    absmax - offset is multiplied by 1/(its block's absmax), clamped to [-1, 1], binned to 1/65535 of the range and
    each bin mapped to its nearest code value: bitsandbytes' CPU `quantize_blockwise`, so the bytes are its bytes (a
    value within half a bin of a midpoint may take the neighbour; the error stays under half a code gap plus a bin).
    A block of equal constants (absmax 0) stores index 0, as bitsandbytes does."""
    offset = absmax.mean()
    blocks = _blocks_of(absmax - offset, NESTED_BLOCK)
    scale = blocks.abs().amax(dim=1)
    inverse = 1.0 / scale
    normalized = torch.clamp(blocks * inverse[:, None], -1.0, 1.0)
    bins = ((normalized + 1.0) * 0.5 * (LUT_BINS - 1) + 0.5).to(torch.int64)
    codes = _dynamic_lut(absmax.device)[bins.clamp(0, LUT_BINS - 1)]
    codes = torch.where((scale == 0)[:, None], torch.zeros_like(codes), codes).reshape(-1)
    return codes[: absmax.numel()], scale, offset


def double_dequantize(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """code[index] · block absmax + offset (fp32)."""
    n = codes.numel()
    values = dynamic_code_8bit(codes.device)[codes.long()]
    return (_blocks_of(values, NESTED_BLOCK) * scale[:, None]).reshape(-1)[:n] + offset
