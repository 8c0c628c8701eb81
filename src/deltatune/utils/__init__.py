"""peft's `peft.utils` import paths (`deltatune.utils.hotswap`, the helpers below), for scripts whose import is all
that changes."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.state_dict import get_base_model_state_dict, get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "_get_submodules",
    "infer_device",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent module, module, its attribute name in the parent) for the module at dotted path `key` (peft's helper,
    used by scripts that swap modules themselves). An unknown path raises torch's AttributeError naming it."""
    parent_name, _, target_name = key.rpartition(".")
    return model.get_submodule(parent_name), model.get_submodule(key), target_name


def infer_device() -> str:
    """The accelerator torch can use here, as a device string: "cuda", "xpu", "mps", else "cpu" (peft's helper)."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
