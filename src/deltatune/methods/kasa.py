"""KaSA, knowledge-aware singular-value adaptation (Wang et al. 2024, arXiv:2412.06071), as a LoRA variant:
`LoraConfig(kasa_config=KasaConfig(...))`.

    W0 <- W0 with its r smallest singular components removed     (once, when the adapter is added: in place)
    ΔW  = s · B diag(ΔΣ) A                                        (ΔΣ = `lora_diag`, r learnable values)

B starts at zero, so the update starts at zero (ΔΣ starts random, as peft). The paper's regularizers (Eq. 9-11),
β·‖ΔΣ‖² + γ·(‖BᵀB - I‖_F + ‖AAᵀ - I‖_F), are returned by `kasa_loss(model)` to add to the task loss.

The truncation changes the base model's weights: disabling, deleting or unloading the adapter leaves the truncated
weights (as in peft). It runs after every target took the adapter (a refused adapter leaves the base untouched) and
again, from the original base, when a saved KaSA adapter is loaded. One layer holds KaSA adapters or other ones,
never both (the others would see another base). Files are peft's: `lora_A`, `lora_B` and `<module>.lora_diag`.
nn.Linear layers (and 4-bit linears); r must be below min(d_in, d_out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, UnsupportedModuleError
from deltatune.methods.lora_layer import LoraLinear, _LoraLayer, register_lora_variant


@dataclass
class KasaConfig:
    """KaSA's settings (peft's `KasaConfig` fields and defaults): the weights of the two regularizers `kasa_loss`
    returns."""

    beta: float = 1e-4
    """Weight of ‖ΔΣ‖² (the learned singular values' L2 penalty)."""
    gamma: float = 1e-3
    """Weight of ‖BᵀB - I‖_F + ‖AAᵀ - I‖_F (keeps the factors near semi-orthogonal, as the SVD form assumes)."""

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"kasa_config.{name} must be a number >= 0, got {value!r}.")


def truncate_smallest(weight: Tensor, r: int) -> Tensor:
    """`weight` (d_out, d_in) without its r smallest singular components: U_k S_k V_kᵀ, k = min(d_out, d_in) - r."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    keep = s.numel() - r
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


def kasa_delta(lora_a: Tensor, lora_b: Tensor, diag: Tensor, scale: float) -> Tensor:
    """ΔW = s · B diag(ΔΣ) A, (d_out, d_in)."""
    return scale * (lora_b * diag) @ lora_a


def kasa_regularizer(lora_a: Tensor, lora_b: Tensor, diag: Tensor, beta: float, gamma: float) -> Tensor:
    """β·Σ ΔΣ² + γ·(‖BᵀB - I‖_F + ‖AAᵀ - I‖_F), float32."""
    a, b, d = lora_a.float(), lora_b.float(), diag.float()
    eye = torch.eye(d.numel(), device=d.device)
    return beta * d.square().sum() + gamma * (torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye))


class KasaVariant:
    """KaSA on nn.Linear wrappers: `lora_diag` is a trained parameter; the base truncation is a from-base init."""

    param_name = "lora_diag"
    changes_base = True  # a layer holds adapters of this variant only, or none of it

    def container(self) -> nn.Module:
        return nn.ParameterDict()

    def init(self, layer: _LoraLayer, name: str, options: dict[str, Any]) -> None:
        r, limit = layer.r[name], min(layer.in_features, layer.out_features)
        if layer.fan_in_fan_out:
            raise UnsupportedModuleError(
                "kasa_config is for nn.Linear layers, not GPT-2 Conv1D; exclude those modules (exclude_modules)."
            )
        if r >= limit:
            raise UnsupportedModuleError(
                f"kasa_config needs r < min(d_in, d_out) = {limit} on {type(layer.base_layer).__name__}"
                f"({layer.in_features}, {layer.out_features}), got r={r}; lower r for it (rank_pattern) or exclude it."
            )
        a = layer.lora_A[name].weight
        layer.lora_diag[name] = nn.Parameter(torch.randn(r, device=a.device, dtype=a.dtype))
        layer.init_from_base[name] = "variant"  # the truncation: once every target took the adapter

    def initialize_from_base(self, layer: _LoraLayer, name: str) -> None:
        layer.write_base_weight(truncate_smallest(layer.weight_out_in(), layer.r[name]))

    def delta_weight(self, layer: _LoraLayer, name: str) -> Tensor:
        a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        return kasa_delta(a, b, layer.lora_diag[name].float(), layer.scaling[name])

    def forward(self, layer: LoraLinear, name: str, x: Tensor, result: Tensor) -> Tensor:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        diag = layer.lora_diag[name]
        if a.dtype != x.dtype:  # cast the small adapter, never the activation
            a, b, diag = a.to(x.dtype), b.to(x.dtype), diag.to(x.dtype)
        xd = F.dropout(x, layer.dropout_p[name], layer.training)
        term = ((xd @ a.T) * diag) @ b.T * layer.scaling[name]
        return result + layer.with_lora_bias(name, term).to(result.dtype)


def kasa_loss(model: nn.Module, adapter_names: str | list[str] | None = None) -> Tensor | float:
    """The KaSA regularizers of `adapter_names` (default: the active adapters) summed over their layers, each with
    its config's β and γ; 0.0 when none of them uses KaSA. Add it to the task loss: `loss = out.loss +
    kasa_loss(model)`."""
    configs = model.peft_config
    names = model.active_adapters if adapter_names is None else adapter_names
    names = [names] if isinstance(names, str) else list(names)
    total: Tensor | float = 0.0
    for module in model.modules():
        if not isinstance(module, _LoraLayer):
            continue
        for name in names:
            if module.variant.get(name) == "kasa_config":
                settings = configs[name].kasa_config
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                total = total + kasa_regularizer(a, b, module.lora_diag[name], settings.beta, settings.gamma)
    return total


register_lora_variant("kasa_config", LoraLinear, KasaVariant())
