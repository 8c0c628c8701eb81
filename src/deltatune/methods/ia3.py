"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv:2205.05638, §3.3).

    attention targets (keys, values):  h = l ⊙ (W x + b)        l ∈ R^{d_out}, one scale per output
    feed-forward targets:              h = W (l ⊙ x) + b        l ∈ R^{d_in},  one scale per input (the FFN's
                                                                inner activation, entering its second linear)
    l starts at ones (the model starts unchanged); trainable params per layer: d_out, or d_in for feed-forward.
    merge: W' = diag(l) W, b' = l ⊙ b (outputs) or W' = W diag(l) (inputs): exact, no added latency.

Mirrors peft's `IA3Config` (peft_type "IA3") and layout: `ia3_l` of shape (d_out, 1), or (1, d_in) for feed-forward
targets. Default targets per family come from the architecture table (keys, values and the FFN's second linear,
which is the feed-forward target), as in peft. Layers: nn.Linear, GPT-2 Conv1D, and nn.Conv1d/2d/3d with one scale
per channel, `ia3_l` of shape (1, C, 1, ...) as peft stores it (out channels; in channels for feed-forward targets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import AdapterConfig
from deltatune.config_types import check_regex
from deltatune.errors import ConfigError
from deltatune.layers import AdapterLayer, module_device
from deltatune.models import arch_for, linear_features
from deltatune.registry import MethodSpec, register_method


@dataclass
class IA3Config(AdapterConfig):
    """Configuration of an (IA)³ adapter (peft's field names and defaults)."""

    peft_type = "IA3"
    peft_ignores = ("layers_to_transform", "layers_pattern")  # peft's config class has no such field

    feedforward_modules: list[str] | str | None = None
    """Targets whose *input* is scaled (the FFN's second linear); must be among target_modules. A list matches name
    suffixes, a string is a regex over the full name. Unset: the family's default (as peft)."""
    fan_in_fan_out: bool = False
    """Recorded for peft; derived per layer (GPT-2 Conv1D)."""
    init_ia3_weights: bool = True
    """True: every scale starts at 1 (the base model). False: random (tests)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_regex(self, "feedforward_modules")
        targets, ff = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(ff, list) and not set(ff) <= set(targets):
            raise ConfigError(
                f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules {targets}; "
                "every feed-forward module must also be a target."
            )


def ia3_defaults(config: IA3Config, model_type: str | None) -> IA3Config:
    """peft's per-family defaults from the architecture table: the attention's key and value projections and the
    FFN's second linear as targets, that linear as the feed-forward one."""
    arch = arch_for(model_type)
    down = ".".join(arch.mlp_down.split(".")[-2:]) if arch.mlp_down else None  # e.g. "mlp.down_proj"
    attention = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in (arch.attn_k, arch.attn_v) if p))
    if config.target_modules is None:
        if not attention or down is None:
            raise ConfigError(
                "target_modules is not set and IA3 has no default for this model; set target_modules and "
                "feedforward_modules."
            )
        config = config.replace(target_modules=[*attention, down])
    if config.feedforward_modules is None:
        config = config.replace(feedforward_modules=[down] if down else [])
    return config


def _is_feedforward(config: IA3Config, module_path: str) -> bool:
    ff = config.feedforward_modules or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module_path) is not None
    return any(module_path == key or module_path.endswith("." + key) for key in ff)


def ia3_layer_kwargs(config: IA3Config, module_path: str) -> dict[str, Any]:
    return {"is_feedforward": _is_feedforward(config, module_path), "init_weights": bool(config.init_ia3_weights)}


class IA3Linear(AdapterLayer):
    """(IA)³ around nn.Linear or GPT-2's Conv1D: a learned scale on the outputs, or on the inputs (feed-forward)."""

    adapter_param_names = ("ia3_l",)
    adapter_other_names = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, *, is_feedforward: bool, init_weights: bool = True) -> None:
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        scale = torch.ones(shape, device=module_device(self.base_layer))
        if not init_weights:
            scale.normal_(mean=1.0, std=0.5)
        self.ia3_l[name] = nn.Parameter(scale)
        self.is_feedforward[name] = is_feedforward

    def _product(self, names: list[str], feedforward: bool) -> Tensor | None:
        scales = [self.ia3_l[n].flatten() for n in names if self.is_feedforward[n] == feedforward]
        if not scales:
            return None
        out = scales[0]
        for scale in scales[1:]:
            out = out * scale
        return out

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        names = self.unmerged_active()
        inputs = self._product(names, feedforward=True)
        if inputs is not None:
            x = x * inputs.to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        outputs = self._product(names, feedforward=False)
        return result if outputs is None else result * outputs.to(result.dtype)

    def _scale_in_layout(self, name: str) -> Tensor:
        """The adapter's scale shaped to multiply the base weight in its own layout (float32)."""
        scale = self.ia3_l[name].detach().float()  # (out, 1) or (1, in) against a (out, in) weight
        return scale.T if self.fan_in_fan_out else scale

    def compose(self, name: str, weight: Tensor) -> Tensor:
        return weight * self._scale_in_layout(name)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        return weight / self._scale_in_layout(name)

    def changes_bias(self, name: str) -> bool:
        # an output scale multiplies the bias too; an input scale, or a layer without bias, leaves it alone
        return not self.is_feedforward[name] and getattr(self.base_layer, "bias", None) is not None

    def compose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias * self.ia3_l[name].detach().float().flatten()

    def decompose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias / self.ia3_l[name].detach().float().flatten()


class IA3Conv(IA3Linear):
    """(IA)³ around nn.Conv1d/2d/3d: one scale per output channel, or per input channel (feed-forward); the scale
    broadcasts over the spatial dimensions, so merging it into the kernel is exact."""

    def __init__(self, base_layer: nn.Module) -> None:
        AdapterLayer.__init__(self, base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = (
            base_layer.in_channels,
            base_layer.out_channels,
            False,
        )
        self.spatial = (1,) * (base_layer.weight.dim() - 2)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = {}

    def add_adapter(self, name: str, *, is_feedforward: bool, init_weights: bool = True) -> None:
        channels = self.in_features if is_feedforward else self.out_features
        scale = torch.ones((1, channels, *self.spatial), device=module_device(self.base_layer))
        if not init_weights:
            scale.normal_(mean=1.0, std=0.5)
        self.ia3_l[name] = nn.Parameter(scale)
        self.is_feedforward[name] = is_feedforward

    def _product(self, names: list[str], feedforward: bool) -> Tensor | None:
        out = super()._product(names, feedforward)
        return None if out is None else out.reshape(1, -1, *self.spatial)  # (1, C, 1, ...) against (N, C, ...)

    def _scale_in_layout(self, name: str) -> Tensor:
        scale = self.ia3_l[name].detach().float().flatten()  # against a (out, in / groups, *kernel) weight
        if not self.is_feedforward[name]:
            return scale.reshape(-1, 1, *self.spatial)
        groups = self.base_layer.groups
        if groups == 1:
            return scale.reshape(1, -1, *self.spatial)
        # grouped: output channel o sees the inputs of its group only, so row o takes that group's slice of l
        per_group = scale.reshape(groups, -1).repeat_interleave(self.out_features // groups, dim=0)
        return per_group.reshape(self.out_features, -1, *self.spatial)


register_method(
    MethodSpec(
        peft_type="IA3",
        config_cls=IA3Config,
        kind="layer",
        layers={nn.Linear: IA3Linear, Conv1D: IA3Linear, nn.Conv1d: IA3Conv, nn.Conv2d: IA3Conv, nn.Conv3d: IA3Conv},
        layer_kwargs=ia3_layer_kwargs,
        param_prefix="ia3_",
        with_defaults=ia3_defaults,
    )
)
