"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353, §4), a LoRA variant.

    W' = m · (W0 + s·B A) / ‖W0 + s·B A‖_c        ‖·‖_c: L2 norm per output feature; m starts at ‖W0 + s·B A‖_c
    y  = W' x + b = (m/‖·‖_c) ⊙ (W0 x + s·B A x) + b

Selected by `LoraConfig(use_dora=True)` (peft keeps `peft_type: LORA`); the magnitude is saved as
`<module>.lora_magnitude_vector` with shape (d_out,). Trainable params per adapted matrix: r·(d_in + d_out) + d_out.
The norm is a constant in backward (§4.3: no gradient through it, less memory). Training needs the full-size update
B A once per forward to compute that norm (DoRA's cost); in eval without grad the norm is cached until A, B or W
change. With dropout p > 0 in training, the base term is recomputed on the dropped input, as peft does.
Supported layers: nn.Linear, GPT-2 Conv1D (and 4-bit linears), nn.Conv1d/2d/3d (magnitude per output channel,
saved as (1, c_out, 1, ...)) and nn.Embedding (magnitude per embedding dim, the norm over the vocabulary), as peft.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.functional.dora import column_norm, dora_linear, dora_merge, dora_unmerge
from deltatune.methods.lora_layer import LoraConv, LoraEmbedding, LoraLinear, _LoraLayer, register_lora_variant


class _Dora(abc.ABC):
    """DoRA on one LoRA wrapper type: subclasses orient the weight and the update as (output feature, ...), give the
    magnitude's saved shape and apply the per-feature scale to the layer's output; init and merge are shared."""

    param_name = "lora_magnitude_vector"

    def container(self) -> nn.Module:
        return nn.ParameterDict()

    def oriented(self, layer: _LoraLayer, weight: Tensor) -> Tensor:
        return weight

    @abc.abstractmethod
    def magnitude_shape(self, layer: _LoraLayer) -> tuple[int, ...]:
        """The magnitude's saved shape (peft's)."""

    @abc.abstractmethod
    def forward(self, layer: _LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor:
        """`result` (the base output plus earlier adapters) with this adapter's DoRA term applied."""

    def init(self, layer: _LoraLayer, name: str, options: dict[str, Any]) -> None:
        with torch.no_grad():
            norm = column_norm(self._combined(layer, name))
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(self.magnitude_shape(layer)))

    def _combined(self, layer: _LoraLayer, name: str) -> Tensor:
        weight = layer.base_weight.detach().float()
        return self.oriented(layer, weight) + self.oriented(layer, layer.delta_weight(name))

    def _scale(self, layer: _LoraLayer, name: str) -> Tensor:
        """m / ‖W0 + ΔW‖_c per output feature, the norm detached (§4.3)."""
        with torch.no_grad():
            norm = column_norm(self._combined(layer, name))
        return layer.lora_magnitude_vector[name].reshape(-1) / norm

    def compose(self, layer: _LoraLayer, name: str, weight: Tensor) -> Tensor:
        magnitude = layer.lora_magnitude_vector[name].float().reshape(-1)
        delta = self.oriented(layer, layer.delta_weight(name))
        # the forward's norm, ‖W0 + ΔW‖_c on the unmerged base, even when `weight` holds adapters merged before
        unmerged = weight
        for earlier in reversed(layer.merged_adapters):
            unmerged = layer.decompose(earlier, unmerged)
        norm = column_norm(self.oriented(layer, unmerged) + delta)
        merged, norm = dora_merge(self.oriented(layer, weight), delta, magnitude, norm)
        layer.merge_state.setdefault(name, {})["dora_norm"] = norm  # unmerge divides by the same norm
        return self.oriented(layer, merged)

    def decompose(self, layer: _LoraLayer, name: str, weight: Tensor) -> Tensor:
        norm = layer.merge_state[name]["dora_norm"]
        magnitude = layer.lora_magnitude_vector[name].float().reshape(-1)
        delta = self.oriented(layer, layer.delta_weight(name))
        return self.oriented(layer, dora_unmerge(self.oriented(layer, weight), delta, magnitude, norm))


class DoraVariant(_Dora):
    """nn.Linear, GPT-2 Conv1D and 4-bit linears: one magnitude per output feature, shape (d_out,)."""

    def oriented(self, layer: _LoraLayer, weight: Tensor) -> Tensor:
        return weight.T if layer.fan_in_fan_out else weight

    def magnitude_shape(self, layer: _LoraLayer) -> tuple[int, ...]:
        return (layer.out_features,)

    def _norm(self, layer: LoraLinear, name: str) -> Tensor:
        """‖W0 + s·B A‖_c without gradient; in no-grad forwards it is cached in the layer's `adapter_cache` (dropped
        when the adapter is deleted or the layer moves) under the identity and in-place version of A, B and W, so
        a replaced or updated tensor is never served a stale norm."""
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        weight = getattr(layer.base_layer, "weight", None)
        key = None
        if isinstance(weight, nn.Parameter):
            key = tuple((id(t), t._version, t.data_ptr()) for t in (a, b, weight))
        cached = layer.adapter_cache.get(name)
        if key is not None and not torch.is_grad_enabled() and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            norm = column_norm(self._combined(layer, name))
        if key is not None:
            layer.adapter_cache[name] = (key, norm)
        return norm

    def forward(self, layer: LoraLinear, name: str, x: Tensor, result: Tensor) -> Tensor:
        """`result` + this adapter's DoRA term, through `dora_linear` (which saves less for backward); the
        gradient reaches A, B and m, not the norm (§4.3)."""
        p = layer.dropout_p[name] if layer.training else 0.0
        weight = layer.weight_out_in() if p > 0 else None  # with dropout the base term is recomputed on x_d
        bias = getattr(layer.base_layer, "bias", None)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        magnitude, norm = layer.lora_magnitude_vector[name], self._norm(layer, name)
        return dora_linear(x, result, a, b, magnitude, norm, layer.scaling[name], bias, weight, p)


class DoraConvVariant(_Dora):
    """Conv1d/2d/3d: one magnitude per output channel, stored (1, c_out, 1, ...) as peft does."""

    def magnitude_shape(self, layer: _LoraLayer) -> tuple[int, ...]:
        weight = layer.base_weight
        return (1, weight.shape[0], *([1] * (weight.dim() - 2)))

    def forward(self, layer: _LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor:
        base = layer.base_layer
        scale = self._scale(layer, name).to(result.dtype).reshape(self.magnitude_shape(layer))
        p = layer.dropout_p[name]
        if layer.training and p > 0:
            x = F.dropout(x, p, training=True)
            base_out = base._conv_forward(x, base.weight, None)
        else:
            bias = base.bias
            base_out = result - bias.reshape(self.magnitude_shape(layer)) if bias is not None else result
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        lora_out = lora_b(lora_a(x.to(lora_a.weight.dtype))) * layer.scaling[name]
        return result + ((scale - 1) * base_out + scale * lora_out).to(result.dtype)


class DoraEmbeddingVariant(_Dora):
    """nn.Embedding: the output features are the embedding dims, so the norm runs over the vocabulary (peft's choice;
    magnitude shape (dim,)): E' = (E0 + ΔE) · m / ‖(E0 + ΔE)ᵀ‖_c."""

    def oriented(self, layer: _LoraLayer, weight: Tensor) -> Tensor:
        return weight.T

    def magnitude_shape(self, layer: _LoraLayer) -> tuple[int, ...]:
        return (layer.base_weight.shape[1],)

    def forward(self, layer: _LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor:
        scale = self._scale(layer, name).to(result.dtype)
        return scale * (result + layer.lora_output(name, x).to(result.dtype))


register_lora_variant("use_dora", LoraLinear, DoraVariant())
register_lora_variant("use_dora", LoraConv, DoraConvVariant())
register_lora_variant("use_dora", LoraEmbedding, DoraEmbeddingVariant())
