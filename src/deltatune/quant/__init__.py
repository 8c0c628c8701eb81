"""4-bit base models for QLoRA: NF4/FP4 blockwise quantization with double quantization, in pure PyTorch
(any device), with bitsandbytes' kernels used on CUDA when installed.

    model = deltatune.quantize_model(model, deltatune.QuantConfig())        # Linear -> Linear4bit, layer by layer
    model = deltatune.get_peft_model(model, deltatune.LoraConfig(...))        # LoRA on the 4-bit layers
    merged = deltatune.quant.merge_and_dequantize(model)                      # exact merge into a 16/32-bit model
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from deltatune.inject import replace_module
from deltatune.quant.bnb_format import load_bnb_4bit_causal_lm, save_bnb_4bit
from deltatune.quant.linear4bit import Linear4bit, adapter_prefixes, in_adapter, linears_to_quantize
from deltatune.quant.prepare import cast_mixed_precision_params, prepare_model_for_kbit_training
from deltatune.quant.state import DTYPES, QuantConfig, QuantState, dequantize_4bit, quantize_4bit

__all__ = [
    "Linear4bit",
    "QuantConfig",
    "QuantState",
    "dequantize_4bit",
    "dequantize_model",
    "load_bnb_4bit_causal_lm",
    "save_bnb_4bit",
    "merge_and_dequantize",
    "prepare_model_for_kbit_training",
    "cast_mixed_precision_params",
    "quantize_4bit",
    "quantize_model",
]


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace every nn.Linear (except `config.skip_modules` and the output head) by a Linear4bit, one layer at a time:
    each full-precision weight is released as soon as its 4-bit copy exists, so memory shrinks as it goes.
    Embeddings and norms stay in their precision; adapters already in the model stay as they are (full precision,
    trainable). Returns the same model object."""
    config = config or QuantConfig()
    names = linears_to_quantize(model, config)
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, Linear4bit.from_linear(linear, config))
        linear.weight = None  # drop the only other reference to the full-precision weight now
        del linear
    gc.collect()
    adapters = adapter_prefixes(model)
    for name, param in model.named_parameters():  # the base is frozen; adapters already in the model keep training
        if not in_adapter(name, adapters):
            param.requires_grad_(False)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Linear4bit by an nn.Linear holding its dequantized weight (in `dtype`, default its compute
    dtype). Works inside adapter wrappers too."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            target = dtype or DTYPES[module.compute_dtype]
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.packed.device,
                dtype=target,
            )
            linear.weight.copy_(module.dequantize(target))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            replace_module(model, name, linear)
    return model


def merge_and_dequantize(peft_model, dtype: torch.dtype | None = None, safe_merge: bool = True) -> nn.Module:
    """Merge adapters into a 4-bit base without re-quantizing: dequantize every 4-bit layer (to `dtype`, default
    float32 for the most exact merge), then merge and unload. Returns a plain model with no 4-bit layers."""
    dequantize_model(peft_model.get_base_model(), dtype or torch.float32)
    return peft_model.merge_and_unload(safe_merge=safe_merge)
