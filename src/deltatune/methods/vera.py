"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

    h = W0 x + λ_b ⊙ (B[:d_out] (λ_d ⊙ (A[:, :d_in] x)))
    A (r, max d_in) and B (max d_out, r) are frozen, random, regenerated from `projection_prng_key`, and shared by all
    targeted layers of an adapter; λ_d (r,) starts at d_initial and λ_b (d_out,) at zero.
    trainable params per layer: r + d_out (the paper's |Θ| = L·(d_model + r) for square layers).

Mirrors peft's `VeraConfig` (peft_type "VERA"): per-layer `vera_lambda_b`, `vera_lambda_d`; the shared projections are
saved as `base_model.vera_A` / `base_model.vera_B` when `save_projection` is true (else rebuilt from the seed).
Layers: nn.Linear, GPT-2 Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.functional.vera import vera_delta, vera_projections
from deltatune.layers import AdapterLayer, bias_parameters, module_device
from deltatune.models import default_lora_targets, linear_features
from deltatune.registry import MethodSpec, register_method


@dataclass
class VeraConfig(AdapterConfig):
    """Configuration of a VeRA adapter (peft's field names and defaults)."""

    peft_type = "VERA"
    peft_ignores = ("exclude_modules",)  # peft's config class has no such field

    r: int = 256
    """Rank of the shared random projections (VeRA affords much larger r than LoRA: it trains only r + d_out)."""
    projection_prng_key: int = 0
    """Seed of the shared projections A and B."""
    save_projection: bool = True
    """Save A and B with the adapter (safer across torch versions) or rebuild them from the seed on load."""
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    """Initial value of every λ_d entry (the paper suggests <= 0.1)."""
    fan_in_fan_out: bool = False
    """Recorded for peft; derived per layer (GPT-2 Conv1D)."""
    bias: Literal["none", "all", "vera_only"] = "none"
    init_weights: bool = True
    """True: λ_b = 0 (starts at the base model). False: λ_b random (tests)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}.")
        if self.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f'bias must be "none", "all" or "vera_only", got {self.bias!r}.')


class VeraProjections(nn.Module):
    """The adapter's shared frozen A and B (buffers; persistent iff save_projection)."""

    def __init__(self, config: VeraConfig, targets: list[nn.Module]) -> None:
        super().__init__()
        max_in = max(linear_features(m)[0] for m in targets)
        max_out = max(linear_features(m)[1] for m in targets)
        a, b = vera_projections(config.projection_prng_key, config.r, max_in, max_out)
        device = module_device(targets[0])
        self.register_buffer("vera_A", a.to(device), persistent=config.save_projection)
        self.register_buffer("vera_B", b.to(device), persistent=config.save_projection)


def vera_layer_kwargs(config: VeraConfig, module_path: str) -> dict[str, Any]:
    return {
        "r": config.r,
        "dropout": float(config.vera_dropout),
        "d_initial": float(config.d_initial),
        "init_weights": bool(config.init_weights),
    }


class VeraLinear(AdapterLayer):
    """VeRA around nn.Linear or GPT-2's Conv1D."""

    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    adapter_other_names = ("shared", "dropout_p")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base_layer)
        self.vera_lambda_b, self.vera_lambda_d = nn.ParameterDict(), nn.ParameterDict()
        self.shared: dict[str, VeraProjections] = {}  # references only: the PeftModel owns the projections
        self.dropout_p: dict[str, float] = {}

    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        shared: VeraProjections,
        dropout: float = 0.0,
        d_initial: float = 0.1,
        init_weights: bool = True,
    ) -> None:
        device = shared.vera_A.device
        lambda_b = torch.zeros(self.out_features, device=device)
        if not init_weights:
            lambda_b.normal_(std=0.5)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(torch.full((r,), d_initial, device=device))
        self.shared[name], self.dropout_p[name] = shared, dropout

    def _projections(self, name: str) -> tuple[Tensor, Tensor]:
        shared = self.shared[name]
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features, :]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            a, b = self._projections(name)
            xd = F.dropout(x, self.dropout_p[name], self.training).to(a.dtype)
            h = (xd @ a.T) * self.vera_lambda_d[name]
            result = result + ((h @ b.T) * self.vera_lambda_b[name]).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> Tensor:
        a, b = self._projections(name)
        delta = vera_delta(a.float(), b.float(), self.vera_lambda_d[name].float(), self.vera_lambda_b[name].float())
        return delta.T if self.fan_in_fan_out else delta

    def compose(self, name: str, weight: Tensor) -> Tensor:
        return weight + self.delta_weight(name)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        return weight - self.delta_weight(name)


def vera_extra_trainable(model: nn.Module, config: VeraConfig, adapter_name: str) -> list[str]:
    return bias_parameters(model, config.bias, VeraLinear, adapter_name)


register_method(
    MethodSpec(
        peft_type="VERA",
        config_cls=VeraConfig,
        kind="layer",
        layers={nn.Linear: VeraLinear, Conv1D: VeraLinear},
        layer_kwargs=vera_layer_kwargs,
        param_prefix="vera_",
        extra_trainable=vera_extra_trainable,
        default_targets=default_lora_targets,
        make_shared=VeraProjections,
    )
)
