"""Hot-swapping LoRA adapters: new weights into an existing adapter slot, in place (peft's names).

    prepare_model_for_compiled_hotswap(model, target_rank=16)   # before torch.compile
    compiled = torch.compile(model)
    hotswap_adapter(model, "adapters/b", adapter_name="default")  # no re-wrapping, no recompilation

The slot's tensors are overwritten in place, so compiled graphs stay valid. `prepare_model_for_compiled_hotswap` pads
every slot to `target_rank` (zero rows of A and columns of B: the same ΔW) and turns each scale into a 0-d tensor, so
an adapter of another rank or alpha changes values only, never shapes or Python constants (which torch.compile
would guard on). A swap is refused, by name, when the slot is merged (peft silently swaps weights the forward no
longer reads), when the new adapter targets other modules, uses another variant (DoRA, lora_bias), or does not fit
the slot's rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune import io
from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, ConfigError, MergeError
from deltatune.hub import adapter_dir
from deltatune.methods.lora import LoraConfig
from deltatune.methods.lora_layer import LoraLinear, lora_layer_kwargs, lora_module_scale


def _lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, LoraLinear)}


def _pad(linear: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
    """A copy of `linear` with zero rows / columns added up to `rows` x `cols`."""
    out_f, in_f = rows or linear.out_features, cols or linear.in_features
    padded = nn.Linear(
        in_f, out_f, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[: linear.out_features, : linear.in_features].copy_(linear.weight)
        if linear.bias is not None:
            padded.bias.zero_()
            padded.bias[: linear.out_features].copy_(linear.bias)
    padded.weight.requires_grad_(linear.weight.requires_grad)
    return padded


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Pad every LoRA slot to `target_rank` (default: the largest rank present) and make scales tensors (see the
    module doc). Call it before `torch.compile`; on an already compiled model it raises (`check_compiled="error"`),
    warns ("warn") or goes on ("ignore"). `config` is accepted for peft's signature: the slots are read from the
    model itself."""
    if getattr(model, "_orig_mod", None) is not None or type(model).__name__ == "OptimizedModule":
        message = "prepare_model_for_compiled_hotswap must run before torch.compile (the compiled graph keeps shapes)."
        if check_compiled == "error":
            raise AdapterError(message)
        if check_compiled == "warn":
            import warnings

            warnings.warn(message, stacklevel=2)
    layers = _lora_layers(model)
    rank = target_rank or max((layer.r[n] for layer in layers.values() for n in layer.adapter_names), default=0)
    for layer in layers.values():
        for name in layer.adapter_names:
            if layer.lora_A[name].out_features > rank:
                raise ConfigError(f"target_rank={rank} is below adapter {name!r}'s rank {layer.r[name]}.")
            layer.lora_A[name] = _pad(layer.lora_A[name], rows=rank)
            layer.lora_B[name] = _pad(layer.lora_B[name], cols=rank)
            scale = layer.scaling[name]
            layer.scaling[name] = scale if isinstance(scale, Tensor) else torch.tensor(float(scale))


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | Path, adapter_name: str, torch_device: str | None = None, **kwargs: Any
) -> None:
    """Load the adapter saved at `model_name_or_path` into the existing slot `adapter_name`, in place (see the module
    doc). `torch_device` is accepted for peft's signature (tensors go to the slot's device)."""
    if adapter_name not in model.peft_config:
        raise AdapterError(f"no adapter slot {adapter_name!r}; this model has {sorted(model.peft_config)}.")
    directory = adapter_dir(model_name_or_path, kwargs.get("subfolder"), kwargs.get("revision"))
    config = AdapterConfig.from_pretrained(directory)
    slot_config = model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig) or not isinstance(slot_config, LoraConfig):
        raise ConfigError("hotswap_adapter swaps LoRA adapters into LoRA slots.")
    if config.kasa_config is not None or slot_config.kasa_config is not None:
        raise ConfigError("KaSA adapters are not hot-swapped: each truncates the base weights for its own ranks; load "
                          "the new one into a fresh model.")  # fmt: skip
    for flag in ("use_dora", "lora_bias", "velora_config", "use_bdlora"):
        if bool(getattr(config, flag)) != bool(getattr(slot_config, flag)):
            raise ConfigError(f"{directory}: {flag}={getattr(config, flag)} but the slot has "
                              f"{getattr(slot_config, flag)}; swap only adapters of the same kind.")  # fmt: skip
    layers = {p: m for p, m in _lora_layers(model).items() if adapter_name in m.adapter_names}
    merged = [p for p, m in layers.items() if adapter_name in m.merged_adapters]
    if merged:
        raise MergeError(f"adapter {adapter_name!r} is merged into {len(merged)} layers (e.g. {merged[0]}); "
                         "unmerge_adapter() before swapping, or the swapped weights would not be used.")  # fmt: skip
    found = io.from_peft_keys(io.read_tensors(directory))
    new = {path: (found.get(f"{path}.lora_A.weight"), found.get(f"{path}.lora_B.weight")) for path in layers}
    missing = [p for p, (a, b) in new.items() if a is None or b is None]
    extra = sorted({k.rsplit(".lora_", 1)[0] for k in found} - set(layers))
    if missing or extra:
        raise ConfigError(f"{directory} adapts other modules than slot {adapter_name!r} (missing "
                          f"{missing[:2]}, extra {extra[:2]}); hot-swap needs the same target modules.")  # fmt: skip
    with torch.no_grad():
        for path, layer in layers.items():
            _swap_into(layer, adapter_name, *new[path], config, path)
    model.peft_config[adapter_name] = config.replace(inference_mode=slot_config.inference_mode)


def _swap_into(layer: LoraLinear, name: str, a: Tensor, b: Tensor, config: LoraConfig, path: str) -> None:
    slot_a, slot_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.shape[0] > slot_a.shape[0] or a.shape[1:] != slot_a.shape[1:] or b.shape[0] != slot_b.shape[0]:
        raise ConfigError(f"{path}: the new adapter's factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the "
                          f"slot's {tuple(slot_a.shape)} / {tuple(slot_b.shape)}; prepare_model_for_compiled_hotswap("
                          "target_rank=...) with the largest rank first.")  # fmt: skip
    r = a.shape[0]
    slot_a.zero_()
    slot_b.zero_()
    slot_a[:r].copy_(a)
    slot_b[:, :r].copy_(b)
    args = lora_layer_kwargs(config, path)
    scale = lora_module_scale(config, path)
    if isinstance(layer.scaling[name], Tensor):
        layer.scaling[name].fill_(scale)  # in place: a compiled graph reads the same tensor
    else:
        layer.scaling[name] = scale
    layer.r[name], layer.lora_alpha[name] = args["r"], args["lora_alpha"]
