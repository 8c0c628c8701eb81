"""Bottleneck adapters: small down-project -> non-linearity -> up-project modules inside each block.

    sequential (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247):
        h <- h + s · W_up f(W_down h + b_down) + s · b_up     on a sub-layer's output h, before its residual add
    parallel (He et al. 2022, arXiv:2110.04366):
        h <- F(x) + s · W_up f(W_down x + b_down) + s · b_up  beside the feed-forward block F, from its input x
    trainable per adapter module: 2·d·m + m + d (d the hidden size, m the bottleneck size).

Placements (the `adapters` library's presets): "houlsby" after the attention output projection and after the FFN
(swish), "pfeiffer" after the FFN only (relu), "parallel" beside the FFN (relu, s = 4). Where they go comes from the
architecture table (attention output, the FFN's second linear, the FFN module), so every family in it works without
code here. W_up and both biases start at zero (the model starts exactly at the base; `init_weights="bert"` uses the
official Houlsby code's N(0, 1e-3) for both matrices instead, near the identity). A non-linear adapter cannot be
folded into the weights: merging is refused with that reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, ConfigError, MergeError
from deltatune.layers import AdapterLayer, module_device
from deltatune.models import arch_for, last_linear_width
from deltatune.registry import MethodSpec, register_method

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}
_PRESETS = {"houlsby": ("swish", 1.0), "pfeiffer": ("relu", 1.0), "parallel": ("relu", 4.0)}


@dataclass
class BottleneckConfig(AdapterConfig):
    """Configuration of bottleneck adapters (deltatune's `peft_type: BOTTLENECK`; peft has no such method)."""

    peft_type = "BOTTLENECK"

    adapter_type: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: int = 16
    """Bottleneck size m = d / reduction_factor (Pfeiffer's default 16: 48 on BERT-base)."""
    bottleneck_size: int | None = None
    """m directly (overrides reduction_factor; Houlsby's experiments use 8-256, 64 in the official code)."""
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] | None = None
    """Unset: the placement's preset (houlsby swish, pfeiffer and parallel relu)."""
    scaling: float | None = None
    """s; unset: 1 for sequential placements, 4 for parallel (He et al.)."""
    init_weights: Literal["zeros", "bert"] = "zeros"
    fusion_of: list[str] | None = None
    """AdapterFusion (Pfeiffer et al. 2021): this adapter combines the named, already added bottleneck adapters of the
    same placement; only its query/key/value projections train (the combined adapters stay frozen)."""
    train_layer_norms: bool = False
    """Also train the blocks' normalization layers in place (Houlsby trains every LayerNorm); saved with the adapter."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_type not in _PRESETS:
            raise ConfigError(f"adapter_type must be one of {sorted(_PRESETS)}, got {self.adapter_type!r}.")
        if self.non_linearity is not None and self.non_linearity not in _ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {sorted(_ACTIVATIONS)}, got {self.non_linearity!r}.")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1):
            raise ConfigError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}.")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}.")
        if self.fusion_of is not None and (
            not isinstance(self.fusion_of, list)
            or not self.fusion_of
            or not all(isinstance(n, str) for n in self.fusion_of)
        ):
            raise ConfigError(f"fusion_of must list the names of the adapters to combine, got {self.fusion_of!r}.")
        if self.init_weights not in ("zeros", "bert"):
            raise ConfigError(f'init_weights must be "zeros" or "bert", got {self.init_weights!r}.')


def _in_block(path: str, layers: str) -> str:
    """A regex for the module at `path` (relative to a block, digits generalised) inside any block of `layers`."""
    block = re.escape(layers.rsplit(".", 1)[-1]) + r"\.\d+"
    inner = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in path.split("."))
    return rf"(.*\.)?{block}\.{inner}"


def bottleneck_defaults(config: BottleneckConfig, model_type: str | None) -> BottleneckConfig:
    """Placement -> target modules, from the architecture table (see the module doc)."""
    if config.target_modules is not None:
        return config
    arch = arch_for(model_type)
    if not arch.layers or arch.mlp_down is None or (config.adapter_type == "houlsby" and arch.attn_o is None):
        raise ConfigError(
            f"{config.adapter_type} adapters need this model family in deltatune.models' table; set target_modules "
            "(modules whose output gets an adapter)."
        )
    if config.adapter_type == "parallel":
        parent = arch.mlp_down.rsplit(".", 1)[0]
        if "." not in arch.mlp_down or not arch.mlp_up or not arch.mlp_up.startswith(parent + "."):
            raise ConfigError(
                "parallel adapters sit beside the feed-forward block, which this family does not hold in one module "
                "(e.g. BERT splits it over intermediate/output); use houlsby or pfeiffer."
            )
        paths = [parent]
    else:
        paths = [arch.attn_o, arch.mlp_down] if config.adapter_type == "houlsby" else [arch.mlp_down]
    return config.replace(target_modules="|".join(_in_block(p, arch.layers) for p in paths))


def bottleneck_layer_kwargs(config: BottleneckConfig, module_path: str) -> dict[str, Any]:
    activation, scaling = _PRESETS[config.adapter_type]
    return {
        "parallel": config.adapter_type == "parallel",
        "reduction_factor": config.reduction_factor,
        "bottleneck_size": config.bottleneck_size,
        "non_linearity": config.non_linearity or activation,
        "scaling": float(config.scaling if config.scaling is not None else scaling),
        "init_weights": config.init_weights,
        "fusion_of": list(config.fusion_of) if config.fusion_of else None,
    }


def _hidden_size(module: nn.Module) -> int:
    """d: a linear's output features, or for a block (parallel) the output features of its last linear."""
    width = last_linear_width(module)
    if width is None:
        raise ConfigError(f"{type(module).__name__} holds no linear layer to size a bottleneck adapter from.")
    return width


class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on a module's output (sequential) or beside it (parallel)."""

    adapter_param_names = ("bottleneck_down", "bottleneck_up", "fusion_query", "fusion_key", "fusion_value")
    adapter_other_names = ("parallel", "activation", "scaling", "fused")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hidden_size = _hidden_size(base_layer)
        self.bottleneck_down, self.bottleneck_up = nn.ModuleDict(), nn.ModuleDict()
        self.fusion_query, self.fusion_key, self.fusion_value = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.fused: dict[str, list[str]] = {}  # fusion adapter -> the adapters it combines

    @property
    def adapter_names(self) -> list[str]:
        return [*self.bottleneck_down.keys(), *self.fusion_query.keys()]

    def add_adapter(
        self,
        name: str,
        *,
        parallel: bool,
        reduction_factor: int,
        bottleneck_size: int | None,
        non_linearity: str,
        scaling: float,
        init_weights: str,
        fusion_of: list[str] | None = None,
    ) -> None:
        if fusion_of is not None:
            self._add_fusion(name, fusion_of)
            return
        d = self.hidden_size
        m = bottleneck_size or max(1, d // reduction_factor)
        device = module_device(self.base_layer)
        down, up = nn.Linear(d, m, device=device), nn.Linear(m, d, device=device)
        with torch.no_grad():
            if init_weights == "bert":
                for linear in (down, up):
                    nn.init.normal_(linear.weight, std=1e-3)
            else:
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(up.weight)
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)
        self.bottleneck_down[name], self.bottleneck_up[name] = down, up
        self.parallel[name], self.activation[name], self.scaling[name] = parallel, non_linearity, scaling

    def _add_fusion(self, name: str, fusion_of: list[str]) -> None:
        missing = [n for n in fusion_of if n not in self.bottleneck_down]
        if missing:
            raise ConfigError(
                f"fusion adapter {name!r} combines {missing}, which this model does not hold: add or load those "
                "bottleneck adapters (same placement) first."
            )
        d, device = self.hidden_size, module_device(self.base_layer)
        query, key, value = (
            nn.Linear(d, d, device=device),
            nn.Linear(d, d, device=device),
            nn.Linear(d, d, bias=False, device=device),
        )
        with torch.no_grad():  # the adapters library's init: Q, K ~ N(0, 0.02); V = identity (+1e-6 off the diagonal)
            for linear in (query, key):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.fusion_query[name], self.fusion_key[name], self.fusion_value[name] = query, key, value
        self.fused[name] = list(fusion_of)

    def set_active(self, names: Any) -> None:
        super().set_active(names)
        for fusion in [n for n in self.active_adapters if n in self.fused]:
            overlap = set(self.fused[fusion]) & set(self.active_adapters)
            if overlap:
                raise AdapterError(f"fusion {fusion!r} already applies {sorted(overlap)}; activate the fusion alone.")

    def _fusion(self, name: str, x: Tensor, h: Tensor) -> Tensor:
        """Σ_n softmax_n((Q h)·(K z_n)) V z_n over the combined adapters' outputs z_n (Pfeiffer et al. 2021, §3.2)."""
        query = self.fusion_query[name]
        outputs = [self._adapter(n, x if self.parallel[n] else h) for n in self.fused[name]]
        z = torch.stack([o.to(query.weight.dtype) for o in outputs], dim=-2)  # (..., N, d)
        q = query(h.to(query.weight.dtype))  # (..., d)
        scores = (self.fusion_key[name](z) @ q.unsqueeze(-1)).squeeze(-1)  # (..., N)
        weights = torch.softmax(scores, dim=-1)
        return (weights.unsqueeze(-1) * self.fusion_value[name](z)).sum(dim=-2)

    def _adapter(self, name: str, h: Tensor) -> Tensor:
        down, up = self.bottleneck_down[name], self.bottleneck_up[name]
        inner = _ACTIVATIONS[self.activation[name]](down(h.to(down.weight.dtype)))
        return up(inner) * self.scaling[name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        names = self.unmerged_active()
        out = self.base_layer(x, *args, **kwargs)
        base_out = out
        for name in names:
            if name in self.fused:
                out = out + self._fusion(name, x, base_out).to(out.dtype)
                continue
            source = x if self.parallel[name] else out
            out = out + self._adapter(name, source).to(out.dtype)
        return out

    def compose(self, name: str, weight: Tensor) -> Tensor:
        raise MergeError(
            "a bottleneck adapter is non-linear (down-project, activation, up-project): it cannot be folded into "
            "the weights; keep it unmerged (it adds two small matmuls per adapted sub-layer)."
        )

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        raise MergeError("bottleneck adapters are never merged.")


def bottleneck_extra_trainable(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[str]:
    """`train_layer_norms`: the parameters of the normalization layers the architecture table names."""
    if not config.train_layer_norms:
        return []
    norms = arch_for(getattr(getattr(model, "config", None), "model_type", None)).norms
    if not norms:
        raise ConfigError("train_layer_norms: this model family's norms are not in deltatune.models' table.")
    return [
        name
        for path, module in model.named_modules()
        if any(path == n or path.endswith("." + n) for n in norms)
        for name, _ in module.named_parameters(prefix=path)
    ]


register_method(
    MethodSpec(
        peft_type="BOTTLENECK",
        mergeable=False,
        config_cls=BottleneckConfig,
        kind="layer",
        layers={nn.Module: BottleneckLayer},
        layer_kwargs=bottleneck_layer_kwargs,
        param_prefix="bottleneck_",
        with_defaults=bottleneck_defaults,
        extra_trainable=bottleneck_extra_trainable,
    )
)
