"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353, §4), a LoRA variant.

    W' = m · (W0 + s·B A) / ‖W0 + s·B A‖_c        ‖·‖_c: L2 norm per output feature; m starts at ‖W0 + s·B A‖_c
    y  = W' x + b = (m/‖·‖_c) ⊙ (W0 x + s·B A x) + b

Selected by `LoraConfig(use_dora=True)` (peft keeps `peft_type: LORA`); the magnitude is saved as
`<module>.lora_magnitude_vector` with shape (d_out,). Trainable params per adapted matrix: r·(d_in + d_out) + d_out.
The norm is a constant in backward (§4.3: no gradient through it, less memory). Training needs the full-size update
B A once per forward to compute that norm (DoRA's cost); in eval without grad the norm is cached until A, B or W
change. With dropout p > 0 in training, the base term is recomputed on the dropped input, as peft does.
Supported layers: nn.Linear, GPT-2 Conv1D (and 4-bit linears).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.functional.dora import column_norm, dora_merge, dora_unmerge
from deltatune.methods.lora import LoraLinear, register_lora_variant


class DoraVariant:
    param_name = "lora_magnitude_vector"

    def init(self, layer: LoraLinear, name: str) -> None:
        with torch.no_grad():
            magnitude = column_norm(layer.weight_out_in() + self._delta(layer, name))
        layer.lora_magnitude_vector[name] = nn.Parameter(magnitude)

    @staticmethod
    def _delta(layer: LoraLinear, name: str) -> Tensor:
        """s · B A as (d_out, d_in), float32."""
        return layer.scaling[name] * (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float())

    def _norm(self, layer: LoraLinear, name: str) -> Tensor:
        """‖W0 + s·B A‖_c without gradient; cached while nothing it depends on changes and no grad is needed."""
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        weight = getattr(layer.base_layer, "weight", None)
        key = (a._version, b._version, weight._version) if isinstance(weight, nn.Parameter) else None
        cache = layer.__dict__.setdefault("_dora_norm_cache", {})
        if key is not None and not torch.is_grad_enabled() and cache.get(name, (None,))[0] == key:
            return cache[name][1]
        with torch.no_grad():
            norm = column_norm(layer.weight_out_in() + self._delta(layer, name))
        if key is not None:
            cache[name] = (key, norm)
        return norm

    def forward(self, layer: LoraLinear, name: str, x: Tensor, result: Tensor) -> Tensor:
        a = layer.lora_A[name].weight.to(x.dtype)
        b = layer.lora_B[name].weight.to(x.dtype)
        scale = (layer.lora_magnitude_vector[name] / self._norm(layer, name)).to(x.dtype)  # gradient reaches m only
        p = layer.dropout_p[name]
        if layer.training and p > 0:
            x = F.dropout(x, p, training=True)
            base_out = x @ layer.weight_out_in().to(x.dtype).T
        else:
            bias = getattr(layer.base_layer, "bias", None)
            base_out = result - bias if bias is not None else result
        lora_out = (x @ a.T) @ b.T * layer.scaling[name]
        return result + ((scale - 1) * base_out + scale * lora_out).to(result.dtype)

    def compose(self, layer: LoraLinear, name: str, weight: Tensor) -> Tensor:
        oriented = weight.T if layer.fan_in_fan_out else weight
        merged, norm = dora_merge(oriented, self._delta(layer, name), layer.lora_magnitude_vector[name].float())
        layer.__dict__.setdefault("_dora_merge_norm", {})[name] = norm
        return merged.T if layer.fan_in_fan_out else merged

    def decompose(self, layer: LoraLinear, name: str, weight: Tensor) -> Tensor:
        oriented = weight.T if layer.fan_in_fan_out else weight
        norm = layer.__dict__["_dora_merge_norm"].pop(name)  # cached by compose: unmerge always follows a merge
        magnitude = layer.lora_magnitude_vector[name].float()
        restored = dora_unmerge(oriented, self._delta(layer, name), magnitude, norm)
        return restored.T if layer.fan_in_fan_out else restored


register_lora_variant("use_dora", DoraVariant())
