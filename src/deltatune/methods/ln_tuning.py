"""LayerNorm tuning (Zhao et al. 2023, arXiv:2312.11420; peft's `LNTuningConfig`): train only the normalization
layers' own parameters (scale, and shift where there is one), everything else frozen.

Each targeted norm keeps a trainable copy per adapter (`ln_tuning_layers`, peft's name and saved keys:
`<path>.ln_tuning_layers.weight`); the forward runs the active adapter's copy, so the original stays intact for
`disable_adapter()` and other adapters. One adapter at a time (a norm cannot be the sum of two). Merging writes the
copy's parameters into the norm; unmerging restores the original bit for bit. Default targets per family come from
the architecture table (the norms in each block and the final one). Any module type can be a target (LayerNorm and
every model's own RMSNorm class alike).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, ConfigError
from deltatune.layers import AdapterLayer
from deltatune.models import arch_for
from deltatune.registry import MethodSpec, register_method


@dataclass
class LNTuningConfig(AdapterConfig):
    """Configuration of LayerNorm tuning (peft's field names; peft_type "LN_TUNING")."""

    peft_type = "LN_TUNING"
    peft_ignores = ("layers_to_transform", "layers_pattern")  # peft's config class has no such field


def ln_tuning_targets(model_type: str | None) -> list[str] | None:
    norms = arch_for(model_type).norms
    return list(norms) if norms else None


class LNTuningLayer(AdapterLayer):
    """A normalization layer with a trainable copy per adapter (see the module doc)."""

    adapter_param_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        if getattr(base_layer, "weight", None) is None:
            raise ConfigError(
                f"LN tuning trains a norm's own scale; {type(base_layer).__name__} has no weight: target norms only."
            )
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    def add_adapter(self, name: str, **kwargs: Any) -> None:
        copied = copy.deepcopy(self.base_layer)
        copied.requires_grad_(True)
        self.ln_tuning_layers[name] = copied

    def set_active(self, names: Any) -> None:
        super().set_active(names)
        if len(self.active_adapters) > 1:
            raise AdapterError("LN tuning runs one adapter at a time (a norm cannot add up); activate one.")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        module = self.ln_tuning_layers[names[0]]
        dtype = next((p.dtype for p in module.parameters()), x.dtype)  # a float32 copy over a half-precision base
        return module(x.to(dtype), *args, **kwargs).to(x.dtype)

    def compose(self, name: str, weight: Tensor) -> Tensor:
        return self.ln_tuning_layers[name].weight.detach().float().clone()

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        return weight  # the original cannot be computed back: merge's exact-restore record keeps it

    def changes_bias(self, name: str) -> bool:
        return getattr(self.ln_tuning_layers[name], "bias", None) is not None

    def compose_bias(self, name: str, bias: Tensor) -> Tensor:
        return self.ln_tuning_layers[name].bias.detach().float().clone()

    def decompose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias


register_method(
    MethodSpec(
        peft_type="LN_TUNING",
        config_cls=LNTuningConfig,
        kind="layer",
        layers={nn.Module: LNTuningLayer},
        layer_kwargs=lambda config, path: {},
        param_prefix="ln_tuning_",
        default_targets=ln_tuning_targets,
    )
)
