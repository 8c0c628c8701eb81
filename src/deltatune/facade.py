"""How a `PeftModel` presents itself to transformers and the libraries built on it (Trainer, TRL).

Two pieces, both generic (no method is named here):

- `Tuner` is peft's `model.base_model` level: it holds the adapted transformers model as `.model`, so user code's
  paths (`model.base_model.model.model.layers[0]`) and `model.state_dict()` keys (`base_model.model.<path>`) are
  peft's. Attribute reads fall through to the model, as peft's tuner does. Calling it runs the model's backbone
  (transformers' `PreTrainedModel.base_model`, e.g. `LlamaModel` under `LlamaForCausalLM`; the model itself when it
  has no head), which is what code that takes our wrapper for a transformers model expects of `model.base_model`:
  TRL's fused LM head calls it for hidden states. peft's tuner-level calls (`TUNER_API`: `set_adapter`, `merge_adapter`,
  `peft_config`, ...) are answered by the `PeftModel` it belongs to.
- `PretrainedFacade` makes `isinstance(model, transformers.PreTrainedModel)` true without being one: every attribute
  `PreTrainedModel` defines is read from (and written to) the wrapped model, except what `nn.Module` defines (moving,
  train/eval act on the wrapper with its adapters) and what `PeftModel` defines itself. transformers' `Trainer` saves a
  `PreTrainedModel` through its own `save_pretrained` (`Trainer._save`): that is how checkpoints hold the adapter.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers import PreTrainedModel

TUNER_API = (
    "set_adapter",
    "delete_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "add_weighted_adapter",
    "active_adapters",
    "peft_config",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "set_requires_grad",
    "update_and_allocate",
    "get_nb_trainable_parameters",
    "prefix",
)
"""What peft's tuner (`BaseTuner`) answers itself: the tuner level answers it from its `PeftModel` (the same
adapters, the same config dict), never from the transformers model's own PEFT integration, which has these names
too and would refuse to work without peft."""


class Tuner(nn.Module):
    """peft's `base_model` level: `.model` is the transformers model with the adapters in it."""

    def __init__(self, model: nn.Module, owner: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.__dict__["_owner"] = owner  # the PeftModel (a plain attribute: not a submodule, no second state dict)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        backbone = getattr(self.model, "base_model", None)
        return (backbone if isinstance(backbone, nn.Module) else self.model)(*args, **kwargs)

    @property
    def active_adapter(self) -> str | list[str] | None:
        """peft's tuner-level answer: the active adapter's name, or the list of them when several are active."""
        owner = self.__dict__.get("_owner")
        if owner is None:
            return getattr(self._modules["model"], "active_adapter", None)
        active = owner.active_adapters
        return active[0] if len(active) == 1 else (active or None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_modules" not in self.__dict__ or "model" not in self._modules:
                raise
            owner = self.__dict__.get("_owner")
            if owner is not None and name in TUNER_API:
                return getattr(owner, name)
            return getattr(self._modules["model"], name)


def _forwarded(name: str) -> property:
    def get(self: nn.Module) -> Any:
        return getattr(self.get_base_model(), name)

    def set_(self: nn.Module, value: Any) -> None:
        setattr(self.get_base_model(), name, value)

    def delete(self: nn.Module) -> None:
        delattr(self.get_base_model(), name)

    return property(get, set_, delete, doc=f"The wrapped model's `{name}`.")


def _pretrained_names() -> set[str]:
    names: set[str] = set()
    for klass in PreTrainedModel.__mro__:
        if klass not in (nn.Module, object):
            names |= set(vars(klass))
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


class PretrainedFacade(PreTrainedModel):
    """Base class of `PeftModel`: a `PreTrainedModel` by type, the wrapped model's by attribute (see module doc).

    Subclasses call `nn.Module.__init__` (never `PreTrainedModel.__init__`, which would build a second config) and
    define `get_base_model()`.
    """


for _name in _pretrained_names():
    if _name in vars(nn.Module):  # to/cuda/half/float/train/eval: nn.Module's, applied to the wrapper and adapters
        setattr(PretrainedFacade, _name, vars(nn.Module)[_name])
    else:
        setattr(PretrainedFacade, _name, _forwarded(_name))
del _name

# The folders transformers' Trainer resumes from (`trainer_utils.get_last_checkpoint` matches the same pattern).
TRAINER_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
