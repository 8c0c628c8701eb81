"""peft's status reports: `get_layer_status(model)` per adapter layer and `get_model_status(model)` for the model.

"irregular" marks a value that differs between layers (the model is in an inconsistent state), as in peft.
Layer names are module paths inside the base model (`model.layers.0.self_attn.q_proj`). A layer's
`active_adapters` lists the active adapters it holds (peft lists the model's active adapters on every layer, held or
not); the model's are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from deltatune.layers import AdapterLayer
from deltatune.model import PeftModel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _one(values: list) -> object:
    """The common value, or "irregular"."""
    unique = {repr(v): v for v in values}
    return next(iter(unique.values())) if len(unique) == 1 else "irregular"


def _layer_status(name: str, layer: AdapterLayer) -> TunerLayerStatus:
    requires_grad, devices = {}, {}
    for adapter in layer.adapter_names:
        params = layer.adapter_parameters(adapter)
        requires_grad[adapter] = _one([p.requires_grad for p in params])
        devices[adapter] = sorted({p.device.type for p in params})
    base = layer.get_base_layer()
    quantized = (
        type(base).__name__ if not isinstance(base, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)) else None
    )
    return TunerLayerStatus(
        name=name,
        module_type=type(layer).__name__,
        enabled=not layer.disabled,
        active_adapters=list(layer.active_adapters),
        merged_adapters=list(layer.merged_adapters),
        requires_grad=requires_grad,
        available_adapters=sorted(layer.adapter_names),
        devices=devices,
        quantization_backend=quantized if quantized and "4bit" in quantized.lower() else None,
    )


def get_layer_status(model: PeftModel) -> list[TunerLayerStatus]:
    """The status of every adapter layer of `model`."""
    return [_layer_status(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)]


def get_model_status(model: PeftModel) -> TunerModelStatus:
    """The model-wide status: counts, and each per-layer value once (or "irregular")."""
    layers = get_layer_status(model)
    trainable, total = model.get_nb_trainable_parameters()
    adapters = sorted({a for s in layers for a in s.available_adapters})
    requires_grad = {a: _one([s.requires_grad[a] for s in layers if a in s.requires_grad]) for a in adapters}
    devices = {a: sorted({d for s in layers for d in s.devices.get(a, [])}) for a in adapters}
    merged: list[str] | Irregular = sorted({a for s in layers for a in s.merged_adapters})
    # irregular only when a layer holds an adapter that is merged elsewhere but not there
    if any((set(s.available_adapters) - set(s.merged_adapters)) & set(merged) for s in layers):
        merged = "irregular"
    return TunerModelStatus(
        base_model_type=type(model.get_base_model()).__name__,
        adapter_model_type=type(model).__name__,
        peft_types={name: config.peft_type for name, config in model.peft_config.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_one([s.enabled for s in layers]),
        active_adapters=model.active_adapters,  # a layer lists only the active adapters it holds
        merged_adapters=merged,
        requires_grad=requires_grad,
        available_adapters=adapters,
        devices=devices,
        quantization_backend=_one([s.quantization_backend for s in layers]),
    )
