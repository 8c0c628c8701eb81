"""VeLoRA (Miles et al. 2024, arXiv:2405.17991) as a LoRA variant: `LoraConfig(velora_config=VeloraConfig(...))`.

The adapter is a plain LoRA (same forward, merge, file layout as peft: `lora_A`, `lora_B` and the projection saved as
`<module>.lora_velora_embed`); only training changes: A's down-projection keeps num_groups coefficients per token
instead of the token (deltatune.functional.velora), and A's gradient is computed from the rank-1 rebuilt input.
The projection v starts as:
    "batch_average" (default): the unit mean of the batch's sub-tokens, recomputed at every training forward;
    "batch_average_once": taken from the first training batch, then kept (also through save and load: a saved
        non-zero projection counts as taken);
    "random": a random unit vector fixed when the adapter is created.
Linear layers (and GPT-2 Conv1D), as peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.functional.lora import lora_up
from deltatune.functional.velora import group_width, unit_projection, velora_down
from deltatune.layers import BufferDict
from deltatune.methods.lora_layer import LoraLinear, _LoraLayer, register_lora_variant

INIT_TYPES = ("batch_average", "batch_average_once", "random")


@dataclass
class VeloraConfig:
    """VeLoRA's settings (peft's `VeloraConfig` fields and defaults)."""

    num_groups: int = 64
    """Sub-tokens per token: more groups rebuild the input more exactly and keep more numbers per token."""
    scale: float = 1.0
    """Factor on the rebuilt input in backward."""
    init_type: Literal["batch_average", "batch_average_once", "random"] = "batch_average"
    """How the projection is chosen (see the module docstring)."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_groups, int) or isinstance(self.num_groups, bool) or self.num_groups <= 0:
            raise ConfigError(f"velora_config.num_groups must be a positive integer, got {self.num_groups!r}.")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not self.scale > 0:
            raise ConfigError(f"velora_config.scale must be a positive number, got {self.scale!r}.")
        if self.init_type not in INIT_TYPES:
            raise ConfigError(
                f"velora_config.init_type must be one of {', '.join(INIT_TYPES)}; got {self.init_type!r}."
            )


class VeloraVariant:
    """VeLoRA on LoRA's linear wrapper: the projection is layer state (a buffer), not a parameter."""

    param_name = "lora_velora_embed"

    def container(self) -> nn.Module:
        return BufferDict()

    def init(self, layer: _LoraLayer, name: str, options: dict[str, Any]) -> None:
        width = group_width(layer.in_features, options["num_groups"])
        weight = layer.base_weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        projection = torch.zeros(width, device=weight.device, dtype=dtype)
        if options["init_type"] == "random":
            projection = unit_projection(torch.randn(width, device=weight.device)).to(dtype)
        layer.lora_velora_embed[name] = projection

    def forward(self, layer: LoraLinear, name: str, x: Tensor, result: Tensor) -> Tensor:
        if not (layer.training and torch.is_grad_enabled()):
            term = layer._lora_term(name, x, None)  # outside training VeLoRA is plain LoRA
            return result + term.to(result.dtype)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if a.dtype != x.dtype:  # cast the small adapter, never the activation
            a, b = a.to(x.dtype), b.to(x.dtype)
        options, p, stored = layer.variant_options[name], layer.dropout_p[name], layer.lora_velora_embed[name]
        init = options["init_type"]
        refit = init == "batch_average" or (init == "batch_average_once" and not stored.any())
        down, projection = velora_down(x, a, stored, options["num_groups"], options["scale"], p, refit)
        if refit:
            with torch.no_grad():
                stored.copy_(projection)
        term = lora_up(down, b, layer.scaling[name], p)
        return result + layer.with_lora_bias(name, term).to(result.dtype)


register_lora_variant("velora_config", LoraLinear, VeloraVariant())
