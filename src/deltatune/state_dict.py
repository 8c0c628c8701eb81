"""peft's state-dict helpers: the adapter's tensors under peft's saved keys, in and out of a model.

state = get_peft_model_state_dict(model)            # {"base_model.model.<path>.lora_A.weight": ..., ...}
set_peft_model_state_dict(model, state)              # checked first: keys and shapes must fit exactly
state = load_peft_weights("out/")                   # read adapter_model.safetensors (never a pickle)
base = get_base_model_state_dict(model)             # the base model's own keys, adapters left out
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from deltatune import io
from deltatune.arguments import flag, refuse_unknown
from deltatune.layers import AdapterLayer, TrainableCopy

if TYPE_CHECKING:  # model.py uses `module_keys` below
    from deltatune.adapter_model import AdapterModel


class LoadResult(NamedTuple):
    """What `set_peft_model_state_dict` returns (peft returns torch's `_IncompatibleKeys`); both lists are always
    empty, since a state that does not fit is refused with a `CheckpointError` before anything changes."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def get_peft_model_state_dict(
    model: AdapterModel, state_dict: dict[str, Tensor] | None = None, adapter_name: str = "default"
) -> dict[str, Tensor]:
    """Adapter `adapter_name`'s tensors under peft's saved keys (adapter name left out). With `state_dict` (the
    model's own `state_dict()`, e.g. gathered from shards), its tensors are used instead of the live ones."""
    view = as_adapter_model(model)
    saved = view.adapter_state_dict(adapter_name)
    if view is not model:  # an injected model: keys relative to it, as peft gives them
        saved = {_relative(k, view, adapter_name): t for k, t in saved.items()}
    if state_dict is None:
        return saved
    out = {}
    for key, name in module_keys(model, saved).items():
        if name not in state_dict:
            raise KeyError(f"state_dict has no entry for {key} (looked for {name!r}); pass model.state_dict().")
        out[key] = state_dict[name]
    return out


def module_keys(model: AdapterModel, saved: dict[str, Tensor]) -> dict[str, str]:
    """peft saved key -> the same tensor's key in `model.state_dict()`, for `saved` as `adapter_state_dict` gives it
    (detached views of the live tensors: matched by storage and shape)."""

    def where(t: Tensor) -> tuple:
        return t.data_ptr(), tuple(t.shape)

    names = {where(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
    return {key: names.get(where(tensor), key) for key, tensor in saved.items()}


def set_peft_model_state_dict(
    model: AdapterModel, peft_model_state_dict: dict[str, Tensor], adapter_name: str = "default", **kwargs: Any
) -> LoadResult:
    """Load peft-keyed tensors into the existing adapter `adapter_name` (keys and shapes checked first)."""
    ignore_mismatched_sizes = flag(
        "set_peft_model_state_dict", "ignore_mismatched_sizes", kwargs.pop("ignore_mismatched_sizes", False)
    )
    refuse_unknown("set_peft_model_state_dict", kwargs, {"low_cpu_mem_usage": (False,)})
    view = as_adapter_model(model)
    if view is not model:
        prefix = _prefix(view, adapter_name)
        peft_model_state_dict = {prefix + k: t for k, t in peft_model_state_dict.items()}
    view.load_adapter_tensors(adapter_name, peft_model_state_dict, ignore_mismatched_sizes=ignore_mismatched_sizes)
    return LoadResult([], [])


def _prefix(view: AdapterModel, adapter_name: str) -> str:
    if adapter_name not in view.peft_config:
        raise KeyError(f"no adapter {adapter_name!r} in this model; it has {sorted(view.peft_config)}.")
    from deltatune.registry import get_method

    return get_method(view.peft_config[adapter_name].peft_type).module_key_prefix


def _relative(key: str, view: AdapterModel, adapter_name: str) -> str:
    prefix = _prefix(view, adapter_name)
    return key[len(prefix) :] if key.startswith(prefix) else key


def as_adapter_model(model: nn.Module) -> AdapterModel:
    """`model` itself when it is a PeftModel; for a model `inject_adapter_in_model` adapted (its configs in
    `model.peft_config`), a PeftModel view of it that adds nothing, so the state-dict helpers work on both, as in
    peft."""
    if hasattr(model, "adapter_state_dict"):
        return model
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise TypeError(
            f"{type(model).__name__} holds no deltatune adapter: pass the PeftModel, or a model adapted with "
            "inject_adapter_in_model."
        )
    from deltatune.adapter_model import task_class

    view = task_class(None)(model)  # PeftModel (registered as the default class)
    view.peft_config.update(configs)
    return view


def load_peft_weights(model_id: str | Path, device: str | torch.device | None = None) -> dict[str, Tensor]:
    """The tensors of `model_id/adapter_model.safetensors` (on `device` when given)."""
    tensors = io.read_tensors(model_id)
    return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors


def get_base_model_state_dict(model: AdapterModel) -> dict[str, Tensor]:
    """The base model's state dict under its original keys (those of the model before adapters were added): the
    adapters' tensors left out, the wrappers' infixes (`base_layer`, `original_module`) removed. Merged adapters are
    part of the weights, as in the live model."""
    base = model.get_base_model()
    out = {}
    for key, value in base.state_dict().items():
        original = _original_key(base, key)
        if original is not None:
            out[original] = value
    return out


def set_base_model_state_dict(model: AdapterModel, state_dict: dict[str, Tensor], strict: bool = True) -> LoadResult:
    """Load base-model tensors given under their original keys (what `get_base_model_state_dict` returns) into the
    adapted model, the adapters untouched (peft's inverse of that function). Returns the original keys the dict
    lacks and those the model does not have; with `strict` either is a `CheckpointError` and nothing changes."""
    from deltatune.errors import CheckpointError

    base = model.get_base_model()
    live = {}
    for key in base.state_dict():
        original = _original_key(base, key)
        if original is not None:
            live[original] = key
    missing = sorted(set(live) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(live))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"set_base_model_state_dict: {len(missing)} base keys missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unknown (e.g. {unexpected[:3]}); pass strict=False to load the keys that match."
        )
    base.load_state_dict({live[k]: v for k, v in state_dict.items() if k in live}, strict=False)
    return LoadResult(missing, unexpected)


_WRAPPED_ATTR = {AdapterLayer: "base_layer", TrainableCopy: "original_module"}
"""Per wrapper type, the attribute holding the module it wraps (the only part of it that is the base model's)."""


def _original_key(base: nn.Module, key: str) -> str | None:
    """`key` of `base.state_dict()` without wrapper infixes, or None when it is an adapter's tensor. Resolved against
    the live modules, so a model's own module that happens to be called `base_layer` keeps its name."""
    kept: list[str] = []
    module: nn.Module | None = base
    for part in key.split("."):
        wrapped = next((attr for cls, attr in _WRAPPED_ATTR.items() if isinstance(module, cls)), None)
        if wrapped is not None:
            if part != wrapped:
                return None  # everything in a wrapper but the module it wraps belongs to the adapters
        else:
            kept.append(part)
        module = module._modules.get(part) if module is not None else None
    return ".".join(kept)
