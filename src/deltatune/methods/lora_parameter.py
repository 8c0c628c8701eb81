"""LoRA on a module's `nn.Parameter` rather than its forward (peft's `target_parameters`): e.g. the expert stacks of
a mixture-of-experts layer, which hold one 3-d tensor instead of one nn.Linear per expert.

For a parameter of shape (E, out, in) (or (E, in, out) when the module says `is_transposed`) each expert e gets its
own rank-r pair, stored as peft stores them: A (r·E, in) read as (E, r, in), B (out, r·E) read as (out, r, E), and
ΔW[e] = s · B[:, :, e] A[e]. A 2-d parameter is one "expert": ΔW = s · B A. The forward runs the module with
W + ΔW in place of W (`torch.func.functional_call`: the module's own code is unchanged and gradients reach A and B).
Several parameters of one module nest one wrapper per parameter, the module's first parameter innermost (peft's
nesting, so keys match).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, UnsupportedModuleError
from deltatune.inject import replace_module
from deltatune.layers import AdapterLayer
from deltatune.methods.lora_layer import _LoraLayer, lora_layer_kwargs
from deltatune.methods.lora_options import init_pair


class LoraParameter(_LoraLayer):
    """LoRA on `base_layer.<parameter_name>` (see the module doc)."""

    rows_independent = False  # an expert stack routes tokens: a batch cannot be split by rows here
    printed_name = "ParamWrapper"  # peft's name of this layer

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.base_weight.shape
        self.transposed = len(shape) == 3 and bool(getattr(self._owner(), "is_transposed", False))
        if len(shape) == 2:
            self.num_experts, self.out_features, self.in_features = 1, shape[0], shape[1]
        elif len(shape) == 3:
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if self.transposed else (shape[2], shape[1])
        else:
            raise UnsupportedModuleError(f"target_parameters: {parameter_name} is {len(shape)}-d; 2-d or 3-d only.")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"

    def _owner(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def _path_in_base(self) -> str:
        """The parameter's name as seen from `base_layer` (through any inner wrappers)."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    @property
    def base_weight(self) -> nn.Parameter:
        return getattr(self._owner(), self.parameter_name)

    def add_adapter(self, name: str, **kwargs: Any) -> None:
        if kwargs.get("lora_dropout", 0.0):
            raise UnsupportedModuleError(
                "target_parameters needs lora_dropout=0 (the update is added to the weight, so the input cannot be "
                "dropped for it alone), as in peft."
            )
        if kwargs.get("variant"):
            raise UnsupportedModuleError(f"{kwargs['variant']} does not apply to target_parameters; turn it off.")
        super().add_adapter(name, **kwargs)

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        device = self._device()
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=device)
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, self.r.get(name, r))

    def _device(self) -> torch.device:
        return self.base_weight.device

    def delta(self, name: str) -> Tensor:
        """s · ΔW in the parameter's layout and float32, differentiable (the forward uses it too)."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        if self.num_experts == 1 and self.base_weight.dim() == 2:
            return self.scaling[name] * (b @ a)
        a = a.reshape(self.num_experts, -1, self.in_features)  # (E, r, in)
        b = b.reshape(self.out_features, -1, self.num_experts)  # (out, r, E)
        delta = torch.einsum("ore,eri->eoi", b, a) * self.scaling[name]  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def delta_weight(self, name: str) -> Tensor:
        return self.delta(name).detach()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        adapted = weight + sum(self.delta(n) for n in names).to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {self._path_in_base(): adapted}, args, kwargs)


def _unwrapped_name(name: str) -> str:
    return name.replace(".base_layer", "")


def add_parameter_targets(model: nn.Module, adapter_name: str, config: Any) -> None:
    """Wrap every parameter `config.target_parameters` names (exact name or dotted suffix) for `adapter_name`."""
    keys = sorted(set(config.target_parameters or []))
    if not keys:
        return
    found: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            continue  # its own tensors are not targets; the module it wraps is visited below
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{_unwrapped_name(module_name)}.{param_name}"
            if any(key == k or key.endswith("." + k) for k in keys):
                found.append((_unwrapped_name(module_name), param_name))
    if not found:
        raise ConfigError(f"target_parameters {keys} match no parameter of this model (give '<module>.<parameter>').")
    for path, param_name in found:  # the module's parameter order: the first is wrapped innermost, as in peft
        if not path:
            raise ConfigError(f"target_parameters: {param_name} sits on the top-level model; target a submodule's.")
        layer = _wrapper_for(model, path, param_name)
        layer.add_adapter(adapter_name, **lora_layer_kwargs(config, f"{path}.{param_name}"))


def _wrapper_for(model: nn.Module, path: str, param_name: str) -> LoraParameter:
    outer = model.get_submodule(path)
    module = outer
    while isinstance(module, LoraParameter):
        if module.parameter_name == param_name:
            return module  # a later adapter on the same parameter
        module = module.base_layer
    if isinstance(module, AdapterLayer):
        raise ConfigError(
            f"{path} is adapted through target_modules already; it cannot also have {param_name} targeted: drop one."
        )
    layer = LoraParameter(outer, param_name)
    replace_module(model, path, layer)
    return layer
