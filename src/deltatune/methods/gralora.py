"""GraLoRA: granular low-rank adaptation (Jung et al. 2025, arXiv:2505.20355).

    h = W0 x + s · (ΔW_gra x + B_h A_h x),   s = alpha / (r + hybrid_r)
    ΔW_gra: k x k blocks, block (j, n) of rank r/k (see functional/gralora.py); optional hybrid plain-LoRA part of
    rank hybrid_r.
    trainable params per adapted matrix: (r + hybrid_r) · (d_in + d_out), LoRA's count at rank r + hybrid_r, with
    up to k times LoRA's rank.

Mirrors peft's `GraloraConfig` (peft_type "GRALORA") and parameter names `gralora_A` (k, d_in/k, r),
`gralora_B` (k, r, d_out/k), `gralora_A_general` / `gralora_B_general` (the hybrid part, only when hybrid_r > 0).
Layers: nn.Linear, GPT-2 Conv1D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError, UnsupportedModuleError
from deltatune.functional.gralora import gralora_delta, gralora_project
from deltatune.layers import AdapterLayer, bias_parameters, module_device
from deltatune.models import default_lora_targets, linear_features
from deltatune.registry import MethodSpec, register_method


@dataclass
class GraloraConfig(AdapterConfig):
    """Configuration of a GraLoRA adapter (peft's field names and defaults)."""

    peft_type = "GRALORA"
    peft_ignores = ("exclude_modules",)  # peft's config class has no such field

    r: int = 32
    """Rank budget of the block part (parameter count = LoRA at rank r); must be divisible by gralora_k."""
    hybrid_r: int = 0
    """Rank of an extra plain-LoRA part (Hybrid GraLoRA); 0 = none."""
    alpha: float = 64
    """Scale numerator: the update is multiplied by alpha / (r + hybrid_r)."""
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    """Blocks per side: the weight is split into gralora_k x gralora_k blocks (2 for r <= 32, 4 above)."""
    fan_in_fan_out: bool = False
    """Recorded for peft; derived per layer (GPT-2 Conv1D)."""
    bias: Literal["none", "all", "gralora_only"] = "none"
    init_weights: bool = True
    """True: kaiming-uniform A, zero B (starts at the base model). False: both random (tests)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "gralora_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.r % self.gralora_k:
            raise ConfigError(f"r={self.r} must be divisible by gralora_k={self.gralora_k} (each block gets r/k).")
        if not isinstance(self.hybrid_r, int) or self.hybrid_r < 0:
            raise ConfigError(f"hybrid_r must be a non-negative integer, got {self.hybrid_r!r}.")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}.")
        if not 0.0 <= self.gralora_dropout < 1.0:
            raise ConfigError(f"gralora_dropout must be in [0, 1), got {self.gralora_dropout!r}.")
        if self.bias not in ("none", "all", "gralora_only"):
            raise ConfigError(f'bias must be "none", "all" or "gralora_only", got {self.bias!r}.')


def gralora_layer_kwargs(config: GraloraConfig, module_path: str) -> dict[str, Any]:
    return {
        "r": config.r,
        "hybrid_r": config.hybrid_r,
        "alpha": float(config.alpha),
        "k": config.gralora_k,
        "dropout": float(config.gralora_dropout),
        "init_weights": bool(config.init_weights),
    }


class GraloraLinear(AdapterLayer):
    """GraLoRA around nn.Linear or GPT-2's Conv1D."""

    adapter_param_names = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")
    param_roles = {"gralora_B": "up", "gralora_B_general": "up"}
    adapter_other_names = ("r", "hybrid_r", "scaling", "gralora_k", "dropout_p")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base_layer)
        self.gralora_A, self.gralora_B = nn.ParameterDict(), nn.ParameterDict()
        self.gralora_A_general, self.gralora_B_general = nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.hybrid_r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.gralora_k: dict[str, int] = {}
        self.dropout_p: dict[str, float] = {}

    def add_adapter(
        self, name: str, *, r: int, hybrid_r: int, alpha: float, k: int, dropout: float = 0.0, init_weights: bool = True
    ) -> None:
        if self.in_features % k or self.out_features % k:
            raise UnsupportedModuleError(
                f"GraLoRA needs d_in={self.in_features} and d_out={self.out_features} divisible by gralora_k={k}; "
                f"pick another gralora_k or exclude this module."
            )
        device = module_device(self.base_layer)
        a = torch.empty(k, self.in_features // k, r, device=device)
        nn.init.uniform_(a, -1 / math.sqrt(self.in_features // k), 1 / math.sqrt(self.in_features // k))
        b = torch.zeros(k, r, self.out_features // k, device=device)
        if not init_weights:
            nn.init.uniform_(b, -1 / math.sqrt(self.out_features // k), 1 / math.sqrt(self.out_features // k))
        self.gralora_A[name], self.gralora_B[name] = nn.Parameter(a), nn.Parameter(b)
        if hybrid_r > 0:
            self.gralora_A_general[name] = nn.Linear(self.in_features, hybrid_r, bias=False, device=device)
            self.gralora_B_general[name] = nn.Linear(hybrid_r, self.out_features, bias=False, device=device)
            if init_weights:
                nn.init.zeros_(self.gralora_B_general[name].weight)
        self.r[name], self.hybrid_r[name], self.gralora_k[name], self.dropout_p[name] = r, hybrid_r, k, dropout
        self.scaling[name] = alpha / (r + hybrid_r)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            xd = F.dropout(x, self.dropout_p[name], self.training)
            xd = xd.to(self.gralora_A[name].dtype)
            update = gralora_project(xd, self.gralora_A[name], self.gralora_B[name])
            if name in self.gralora_A_general:
                update = update + self.gralora_B_general[name](self.gralora_A_general[name](xd))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> Tensor:
        """s · ΔW in the base weight's layout, float32."""
        delta = gralora_delta(self.gralora_A[name].float(), self.gralora_B[name].float(), 1.0)
        if name in self.gralora_A_general:
            delta = delta + self.gralora_B_general[name].weight.float() @ self.gralora_A_general[name].weight.float()
        delta = delta * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def compose(self, name: str, weight: Tensor) -> Tensor:
        return weight + self.delta_weight(name)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        return weight - self.delta_weight(name)


def gralora_extra_trainable(model: nn.Module, config: GraloraConfig, adapter_name: str) -> list[str]:
    return bias_parameters(model, config.bias, GraloraLinear, adapter_name)


register_method(
    MethodSpec(
        peft_type="GRALORA",
        config_cls=GraloraConfig,
        kind="layer",
        layers={nn.Linear: GraloraLinear, Conv1D: GraloraLinear},
        layer_kwargs=gralora_layer_kwargs,
        param_prefix="gralora_",
        extra_trainable=gralora_extra_trainable,
        default_targets=default_lora_targets,
    )
)
