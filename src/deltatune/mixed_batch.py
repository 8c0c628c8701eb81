"""A different adapter per row of one batch (peft's `adapter_names=` on forward / generate).

`model(**batch, adapter_names=["a", "b", "__base__", "a"])`: every adapter wrapper (any method, and `modules_to_save`
copies) splits the rows by adapter name, runs each group with only that adapter active ("__base__": none) and puts
the rows back in order. Rows never mix inside a wrapper (linear, convolution and embedding layers treat rows
independently), so each row's output is what a batch of that row alone under `set_adapter(name)` gives. A wrapper
may provide `forward_rows(groups, x, ...)` to do better: LoRA runs its base layer once on the whole batch and adds
each group's low-rank term to its rows (returning None falls back to the per-group forward).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import AdapterError, MixedBatchError

BASE = "__base__"  # peft's name for "no adapter" in adapter_names
PEFT_SUPPORTED = (
    "Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, Conv2d, Conv3d."
)
"""peft's words for a module whose rows it will not split, which its users' code may match; deltatune's follow."""


def _described(wrapper: nn.Module) -> str:
    inner = getattr(wrapper, "original_module", None)  # a modules_to_save copy: name the module it copies
    return type(inner if inner is not None else wrapper).__name__


@functools.lru_cache(maxsize=16)
def row_groups(names: tuple[str, ...], device: torch.device) -> list[tuple[str, Tensor]]:
    """(name, row indices) per distinct name, in first-seen order: computed once per batch, not once per layer."""
    return [(name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
            for name in dict.fromkeys(names)]  # fmt: skip


def split_rows(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a wrapper's `forward(x, ...)`: with `self.row_adapters` set, run it per group of rows (see module doc)."""

    @functools.wraps(forward)
    def per_row(self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        names = getattr(self, "row_adapters", None)
        if names is None:
            return forward(self, *args, **kwargs)
        if not getattr(self, "rows_independent", True):
            raise MixedBatchError(
                f"{PEFT_SUPPORTED} {_described(self)} does not support mixed adapter batches: adapter_names= cannot "
                "split the rows of a batch inside it. Run one adapter per call (set_adapter) instead."
            )
        x, args = args[0], args[1:]
        if len(names) != x.shape[0]:
            raise AdapterError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(names)} names "
                f"for a batch of {x.shape[0]} rows (beam search and num_return_sequences multiply the rows: give one "
                "name per row of the expanded batch)."
            )
        groups = row_groups(tuple(names), x.device)
        grouped = getattr(self, "forward_rows", None)  # a layer may run its base once and only its term per group
        out = grouped(groups, x, *args, **kwargs) if grouped is not None else None
        if out is not None:
            return out
        saved = self.active_adapters
        try:
            for name, rows in groups:
                self.active_adapters = [name] if name != BASE and name in self.adapter_names else []
                part = forward(self, x.index_select(0, rows), *args, **kwargs)
                if not isinstance(part, Tensor) or part.shape[:1] != rows.shape:
                    raise MixedBatchError(
                        f"{PEFT_SUPPORTED} deltatune splits the rows of any module that returns one tensor with the "
                        f"batch first; {_described(self)} returned {type(part).__name__}. Run one adapter per call "
                        "(set_adapter) instead."
                    )
                if out is None:
                    out = part.new_empty((x.shape[0], *part.shape[1:]))
                out.index_copy_(0, rows, part)
        finally:
            self.active_adapters = saved
        return out

    return per_row


@contextlib.contextmanager
def adapters_per_row(model: Any, adapter_names: Sequence[str] | None) -> Iterator[None]:
    """Within the block every wrapper of `model` (a PeftModel) splits its rows by `adapter_names`."""
    if adapter_names is None:
        yield
        return
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in model.peft_config})
    if unknown:
        raise AdapterError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. This model's adapters are "
            f"{sorted(model.peft_config)} (and {BASE!r} for the base model)."
        )
    wrappers = [w for _, w in model._wrappers()]
    if any(getattr(w, "merged", False) for w in wrappers):
        raise AdapterError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first "
            "(a merged adapter is in every row's weights)."
        )
    for wrapper in wrappers:
        wrapper.row_adapters = names
    try:
        yield
    finally:
        for wrapper in wrappers:
            wrapper.row_adapters = None
