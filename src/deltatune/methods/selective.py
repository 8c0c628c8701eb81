"""Selective fine-tuning: train some of the model's own parameters instead of adding new ones. The baselines every
comparison needs: BitFit (Ben Zaken et al. 2022, arXiv:2106.10199: the biases, all or a subset such as the query
and first FFN biases), partial fine-tuning (the top k blocks, modules by name, the output head) and feature
extraction (only the head).

`SelectiveConfig(train_parameters=["bias"])` is BitFit over every module with a bias; `select_modules` narrows the
modules (name suffixes, or a regex), `top_k_layers` keeps those in the last k blocks (with train_parameters
["weight", "bias"]: partial fine-tuning), `train_output_head` adds the head (alone: feature extraction).

Each selected module keeps, per adapter, trainable copies of the selected parameters; the forward runs the module
with them in place of its own (`torch.func.functional_call`), so the originals stay for `disable_adapter()` and
other adapters, and one adapter runs at a time. Saved under the parameters' own names
(`base_model.model.<path>.bias`), exactly what trained. Merging writes the copies into the module; unmerging
restores the originals bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, ConfigError
from deltatune.inject import replace_module
from deltatune.layers import AdapterLayer, TrainableCopy
from deltatune.models import find_layer_list, output_head_name
from deltatune.registry import MethodSpec, register_method

_TRAINABLE_NAMES = ("weight", "bias")


@dataclass
class SelectiveConfig(AdapterConfig):
    """Which of the model's own parameters train (see the module doc). `target_modules` stays empty: the selection
    is made by the fields below."""

    peft_type = "SELECTIVE"

    train_parameters: list[str] = field(default_factory=lambda: ["bias"])
    """Parameter names trained in each selected module: ["bias"] (BitFit) and/or "weight"."""
    select_modules: list[str] | str | None = None
    """Which modules: name suffixes, or a regex over the full name; None: every module owning such a parameter."""
    top_k_layers: int | None = None
    """Only modules inside the last k blocks of the model's layer list (partial fine-tuning)."""
    train_output_head: bool = False
    """Also train the output head's parameters (a classifier or LM head); alone: feature extraction."""

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = []
        super().__post_init__()
        if self.target_modules:
            raise ConfigError("SelectiveConfig selects with select_modules / top_k_layers / train_output_head; leave "
                              "target_modules empty.")  # fmt: skip
        bad = [p for p in self.train_parameters if p not in _TRAINABLE_NAMES]
        if bad or not isinstance(self.train_parameters, list):
            raise ConfigError(f"train_parameters holds {bad or self.train_parameters!r}; use 'weight' and/or 'bias'.")
        if self.top_k_layers is not None and (not isinstance(self.top_k_layers, int) or self.top_k_layers <= 0):
            raise ConfigError(f"top_k_layers must be a positive integer, got {self.top_k_layers!r}.")

    def needs_target_modules(self) -> bool:
        return False


class SelectedParameters(AdapterLayer):
    """A module whose chosen parameters train as per-adapter copies (see the module doc)."""

    adapter_param_names = ("selective_params",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selective_params = nn.ModuleDict()

    def add_adapter(self, name: str, *, parameters: list[str]) -> None:
        copies = nn.ParameterDict()
        for pname in parameters:
            original = getattr(self.base_layer, pname, None)
            if isinstance(original, nn.Parameter):
                copies[pname] = nn.Parameter(original.detach().float().clone())
        if not copies:
            raise ConfigError(f"{type(self.base_layer).__name__} has none of the parameters {parameters}.")
        self.selective_params[name] = copies

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return dict(self.selective_params[name].items()) if name in self.selective_params else {}

    def set_active(self, names: Any) -> None:
        super().set_active(names)
        if len(self.active_adapters) > 1:
            raise AdapterError("selective adapters run one at a time (each replaces the same parameters).")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        copies = self.selective_params[names[0]]
        replaced = {k: v.to(getattr(self.base_layer, k).dtype) for k, v in copies.items()}
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs)

    @property
    def _stored_as_weight(self) -> str:
        """The parameter the merge machinery treats as the weight: `weight`, or `bias` in a bias-only module."""
        return "weight" if getattr(self.base_layer, "weight", None) is not None else "bias"

    @property
    def base_weight(self) -> Tensor:
        return getattr(self.base_layer, self._stored_as_weight)

    def compose(self, name: str, weight: Tensor) -> Tensor:
        copy = self.selective_params[name].get(self._stored_as_weight)
        return weight if copy is None else copy.detach().float().clone()

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        return weight  # the originals cannot be computed back: merge's exact-restore record keeps them

    def changes_bias(self, name: str) -> bool:
        return self._stored_as_weight == "weight" and "bias" in self.selective_params[name]

    def compose_bias(self, name: str, bias: Tensor) -> Tensor:
        return self.selective_params[name]["bias"].detach().float().clone()

    def decompose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias


def task_head_name(model: nn.Module) -> str | None:
    """The model's output head: the LM head (`get_output_embeddings`), else the last top-level linear child (a
    task head such as `classifier`, `score` or `qa_outputs`, possibly already a `modules_to_save` copy)."""
    head = output_head_name(model)
    if head is None:
        linears = [n for n, m in model.named_children() if isinstance(m, (nn.Linear, TrainableCopy))]
        head = linears[-1] if linears else None
    return head


def _selected_modules(model: nn.Module, config: SelectiveConfig) -> dict[str, list[str]]:
    """Module path -> parameter names to train there. Modules already trained whole as `modules_to_save` (a task
    class's head) are left to that."""
    head = task_head_name(model)
    copies = [n for n, m in model.named_modules() if isinstance(m, TrainableCopy)]
    owners = [n for n, m in model.named_modules() if n and any(
        isinstance(getattr(m, p, None), nn.Parameter) for p in config.train_parameters)
        and not any(n == c or n.startswith(c + ".") for c in copies)]  # fmt: skip
    if isinstance(config.select_modules, str):
        owners = [n for n in owners if re.fullmatch(config.select_modules, n)]
    elif config.select_modules is not None:
        owners = [n for n in owners if any(n == k or n.endswith("." + k) for k in config.select_modules)]
    if config.top_k_layers is not None:
        layers_name, layers = find_layer_list(model)
        top = [f"{layers_name}.{i}." for i in range(max(0, len(layers) - config.top_k_layers), len(layers))]
        owners = [n for n in owners if any(n.startswith(t) for t in top)]
    selected = {n: list(config.train_parameters) for n in owners}
    if config.train_output_head:
        if head is None:
            raise ConfigError("train_output_head=True, but this model has no output head (no LM head or task head).")
        if config.select_modules is None and config.top_k_layers is None and config.train_parameters == ["bias"]:
            selected = {}  # the head alone, with BitFit's default parameters: feature extraction
        if head not in copies:
            selected[head] = list(_TRAINABLE_NAMES)  # a head trains whole
    return selected


def add_selected(model: nn.Module, adapter_name: str, config: SelectiveConfig) -> None:
    selected = _selected_modules(model, config)
    head_is_copy = config.train_output_head and isinstance(model.get_submodule(task_head_name(model)), TrainableCopy)
    if not selected and not head_is_copy:
        raise ConfigError(
            f"no module of this model has the parameters {config.train_parameters} in the selection (select_modules="
            f"{config.select_modules!r}, top_k_layers={config.top_k_layers}); a model without biases cannot use BitFit."
        )
    for path, parameters in selected.items():
        module = model.get_submodule(path)
        if not isinstance(module, SelectedParameters):
            if isinstance(module, AdapterLayer):
                raise ConfigError(f"{path} is adapted by another method already; select other modules.")
            module = SelectedParameters(module)
            replace_module(model, path, module)
        module.add_adapter(adapter_name, parameters=parameters)


register_method(
    MethodSpec(
        peft_type="SELECTIVE",
        config_cls=SelectiveConfig,
        kind="layer",
        layers={nn.Module: SelectedParameters},
        layer_kwargs=lambda config, path: {"parameters": config.train_parameters},
        param_prefix="selective_",
        adapt_extra_modules=add_selected,
    )
)
