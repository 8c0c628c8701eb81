"""`QuantState`, `quantize_4bit` / `dequantize_4bit` and `QuantConfig`: the public 4-bit API."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.functional.nf4 import (
    dequantize_blockwise_4bit,
    double_dequantize,
    double_quantize,
    quantize_blockwise_4bit,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class QuantState:
    """A 4-bit tensor: packed codes plus its absmax constants (plain fp32, or double-quantized int8 + scales)."""

    packed: Tensor
    shape: torch.Size
    quant_type: str
    blocksize: int
    absmax: Tensor | None = None
    absmax_codes: Tensor | None = None
    absmax_scale: Tensor | None = None
    absmax_offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    def absmax_fp32(self) -> Tensor:
        if self.double_quant:
            return double_dequantize(self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def tensors(self) -> dict[str, Tensor]:
        names = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        """Bytes of everything stored: packed codes and every quantization constant."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """Quantize `w` blockwise to 4 bits (NF4 or FP4), optionally double-quantizing the absmax constants."""
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f'quant_type must be "nf4" or "fp4", got {quant_type!r}.')
    packed, absmax = quantize_blockwise_4bit(w, quant_type, blocksize)
    state = QuantState(packed, torch.Size(w.shape), quant_type, blocksize)
    if double_quant:
        state.absmax_codes, state.absmax_scale, state.absmax_offset = double_quantize(absmax)
    else:
        state.absmax = absmax
    return state


def dequantize_4bit(state: QuantState, dtype: torch.dtype = torch.float32) -> Tensor:
    """The full-precision tensor a QuantState stands for."""
    return dequantize_blockwise_4bit(
        state.packed, state.absmax_fp32(), state.shape, state.quant_type, state.blocksize, dtype
    )


def _default_compute_dtype() -> str:
    """bf16 where the hardware does it natively (CUDA with bf16), else fp32 (bf16 matmuls are slow on most CPUs)."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


@dataclass
class QuantConfig:
    """How to store a model's linear weights in 4 bits; the defaults are QLoRA's (NF4, blocks of 64, double
    quantization, bf16 compute where supported)."""

    quant_type: str = "nf4"
    """"nf4" (NormalFloat, for normally distributed weights) or "fp4"."""
    blocksize: int = 64
    double_quant: bool = True
    """Quantize the absmax constants too (0.5 -> ~0.127 bits per parameter of overhead)."""
    compute_dtype: str = field(default_factory=_default_compute_dtype)
    """dtype of the dequantized weight in the matmul: "fp32", "bf16" or "fp16"."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Linear layers kept in full precision (name suffixes); the output head is always kept."""
    backend: str = "auto"
    """"auto": bitsandbytes' kernels on CUDA when installed, else pure PyTorch; "torch"; "bitsandbytes"."""

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f'quant_type must be "nf4" or "fp4", got {self.quant_type!r}.')
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}.")
        if not 32 <= self.blocksize <= 4096 or self.blocksize & (self.blocksize - 1):
            raise ConfigError(f"blocksize must be a power of two in [32, 4096], got {self.blocksize}.")
        if self.backend not in ("auto", "torch", "bitsandbytes"):
            raise ConfigError(f'backend must be "auto", "torch" or "bitsandbytes", got {self.backend!r}.')
