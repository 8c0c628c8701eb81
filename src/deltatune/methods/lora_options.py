"""LoRA's options beyond the plain update (peft's `LoraConfig` fields): the adapter-only inits, the conversion of a
base-rewriting init (PiSSA, OLoRA, LoftQ) into a plain LoRA on the original base, layer replication, parameter
targets and trainable token rows. The layers call these; `deltatune.methods.lora` registers them with the method."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from deltatune.errors import ConfigError, UnsupportedModuleError
from deltatune.functional.init import gaussian_a_zero_b, kaiming_a_zero_b
from deltatune.functional.lora import relative_to_initial
from deltatune.functional.nf4 import dequantize_blockwise_4bit, quantize_blockwise_4bit
from deltatune.methods.layer_replication import replicate_layers

if TYPE_CHECKING:
    from deltatune.methods.lora import LoraConfig


def nf4_round_trip(weight: Tensor) -> Tensor:
    """`weight` quantized to NF4 (blocks of 64, no double quantization: what peft's LoftQ uses) and back."""
    packed, absmax = quantize_blockwise_4bit(weight, "nf4", 64)
    return dequantize_blockwise_4bit(packed, absmax, weight.shape, "nf4", 64)


def init_pair(lora_a: Tensor, lora_b: Tensor, init: bool | str, r: int) -> None:
    if init in ("orthogonal", "mica"):
        layers = "linear layers" if init == "orthogonal" else "linear and embedding layers"
        raise UnsupportedModuleError(
            f"init_lora_weights={init!r} is for {layers}; exclude the others (exclude_modules)."
        )
    if init == "gaussian":
        gaussian_a_zero_b(lora_a, lora_b, r)
    elif init:
        kaiming_a_zero_b(lora_a, lora_b)
    # False: keep the random init of both (nn.Linear/Conv defaults), a non-identity start used in tests


def lora_relative_to_initial(
    config: LoraConfig, tensors: dict[str, Tensor], initial: dict[str, Tensor]
) -> tuple[LoraConfig, dict[str, Tensor]]:
    """A plain LoRA on the original base for an adapter trained from a base-rewriting init (PiSSA, OLoRA): each
    pair becomes [B | -B0] [A; A0] (rank 2r, `relative_to_initial`); alpha doubles (x sqrt(2) with rsLoRA) so the
    scale stays the same. peft's conversion, keys and config."""
    if config.use_dora:
        raise ConfigError(
            "a DoRA adapter cannot be converted relative to its initial weights (its magnitude is not low-rank)."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "the conversion with use_rslora and rank_pattern/alpha_pattern is not supported (as in peft)."
        )
    out = dict(tensors)
    for key in tensors:
        for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if key.endswith(a_name):
                b_key = key[: -len(a_name)] + b_name
                out[key], out[b_key] = relative_to_initial(tensors[key], tensors[b_key], initial[key], initial[b_key])
    factor = 2**0.5 if config.use_rslora else 2
    return config.replace(
        init_lora_weights=True,
        r=config.r * 2,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: v * 2 for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * 2 for k, v in config.alpha_pattern.items()},
    ), out


def lora_prepare_model(model: nn.Module, config: LoraConfig) -> Callable[[], None]:
    """`layer_replication`: the replicated stack the adapter's targets are then found in."""
    return replicate_layers(model, config.layer_replication) if config.layer_replication else (lambda: None)
