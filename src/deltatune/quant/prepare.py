"""`prepare_model_for_kbit_training` (peft's name and arguments), for deltatune's 4-bit layers and bitsandbytes'."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.quant.linear4bit import Linear4bit


def _is_quantized(model: nn.Module) -> bool:
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        return True
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a quantized base ready for adapter training: freeze every parameter, keep the unquantized 16-bit ones
    (norms, embeddings, head) in float32 for stable training, and turn on gradient checkpointing (with the
    input-embedding gradient hook the reentrant variant needs). The 4-bit weights themselves are buffers and stay as
    they are. Returns the same model."""
    for param in model.parameters():
        param.requires_grad_(False)
    if _is_quantized(model):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": True})
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """peft's helper for training in 16 bits without autocast: frozen parameters go to `dtype`, trainable ones
    (the adapter) to float32, in place."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
