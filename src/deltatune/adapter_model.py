"""The interface the adapter bookkeeping, saving and state-dict functions work on, and which class serves a task.

`saving.py`, `state_dict.py` and the checkpoint mixin need a few things of a model that holds adapters; they name
them here (`AdapterModel`) instead of importing `PeftModel`, which composes them. Likewise the task classes
(`tasks.py`, on top of `model.py`) register themselves here, so that `get_peft_model` and `from_pretrained` find the
class of a config's `task_type` without importing upward.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.config import AdapterConfig


class AdapterModel(Protocol):
    """A model with named adapters (PeftModel is the one in this library)."""

    peft_config: dict[str, AdapterConfig]

    def get_base_model(self) -> nn.Module: ...

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]: ...

    def load_adapter_tensors(
        self, adapter_name: str, tensors: dict[str, Tensor], ignore_mismatched_sizes: bool = False
    ) -> None: ...

    def create_or_update_model_card(self, output_dir: Any, adapter_name: str | None = None) -> None: ...

    def _base_path(self, config: AdapterConfig) -> str | None: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Tensor]]: ...


_TASK_CLASSES: dict[str, type] = {}
_DEFAULT: list[type] = []


def register_task_class(task_type: str | None, cls: type) -> type:
    """`cls` serves adapters of `task_type` (None: the class of adapters without one, PeftModel)."""
    if task_type is None:
        _DEFAULT[:] = [cls]
    else:
        _TASK_CLASSES[str(getattr(task_type, "value", task_type))] = cls
    return cls


def task_class(task_type: Any) -> type:
    """The class for a config's task_type (the default class when unset)."""
    if task_type is None:
        return _DEFAULT[0]
    key = str(getattr(task_type, "value", task_type))
    if key not in _TASK_CLASSES:
        raise ConfigError(f"task_type {task_type!r} is not one of {sorted(_TASK_CLASSES)}.")
    return _TASK_CLASSES[key]


def dispatches_on_task_type(cls: type) -> bool:
    """Whether `cls` is the default class, which hands a loaded adapter to its task's class (peft does the same)."""
    return bool(_DEFAULT) and cls is _DEFAULT[0]
