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
from deltatune.arguments import refuse_unknown
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
    saved = model.adapter_state_dict(adapter_name)
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
    refuse_unknown(
        "set_peft_model_state_dict", kwargs, {"ignore_mismatched_sizes": (False,), "low_cpu_mem_usage": (False,)}
    )
    model.load_adapter_tensors(adapter_name, peft_model_state_dict)
    return LoadResult([], [])


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
