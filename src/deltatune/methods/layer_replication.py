"""Layer replication (peft's `layer_replication` on `LoraConfig`): grow (or shrink) a model's layer stack from
ranges of its own layers, the copies sharing the original weights, before the adapter is added, so each position in
the new stack gets its own adapter (e.g. `[[0, 4], [2, 5]]` turns layers 0-4 into 0, 1, 2, 3, 2, 3, 4).

The stack is found as peft finds it (so saved adapters line up): below the chain of `.model` attributes (and a
`.bert`), the `ModuleList` at `.layers`, `.encoder.layer` or `.h`. Every copy's `layer_idx` (transformers' index into
the KV cache) is renumbered and `config.num_hidden_layers` (and `layer_types`, where present) follow the new stack.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from deltatune.errors import ConfigError


def _stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute path) of the layer list."""
    owner = model
    while isinstance(getattr(owner, "model", None), nn.Module):
        owner = owner.model
    if isinstance(getattr(owner, "bert", None), nn.Module):
        owner = owner.bert
    for path in ("layers", "encoder.layer", "h"):
        try:
            found = owner.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return owner, path
    raise ConfigError(
        "layer_replication: no layer stack found (a ModuleList at .layers, .encoder.layer or .h, as in LLaMA, BERT "
        "or Falcon-style models); remove layer_replication for this model."
    )


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are the original ones (no weight memory is duplicated)."""
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> Callable[[], None]:
    """Replace the layer stack per `layer_map` (list of [start, end) ranges); returns a function that undoes it."""
    owner, path = _stack(model)
    applied = getattr(owner, "_replicated_by", None)
    if applied is not None:  # a later adapter on the same model: the stack is built already
        if [list(r) for r in applied] != [list(r) for r in layer_map]:
            raise ConfigError(
                f"this model's layers were replicated by {applied!r}; an adapter cannot ask for {layer_map!r}."
            )
        return lambda: None
    layers = owner.get_submodule(path)
    if not all(isinstance(r, (list, tuple)) and len(r) == 2 and 0 <= r[0] < r[1] <= len(layers) for r in layer_map):
        raise ConfigError(
            f"layer_replication {layer_map!r} must be [start, end) ranges within the model's {len(layers)} layers."
        )
    config = getattr(model, "config", None)
    before = (getattr(config, "num_hidden_layers", None), copy.copy(getattr(config, "layer_types", None)))
    new_layers, types = [], []
    for start, end in layer_map:
        for i in range(start, end):
            clone = shared_copy(layers[i])
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new_layers)
            new_layers.append(clone)
            types.append(before[1][i] if before[1] else None)
    parent, _, name = path.rpartition(".")
    holder = owner.get_submodule(parent) if parent else owner
    setattr(holder, name, nn.ModuleList(new_layers))
    _set_counts(config, len(new_layers), types if before[1] else None)
    owner._replicated_by = [list(r) for r in layer_map]

    def undo() -> None:
        setattr(holder, name, layers)
        _set_counts(config, *before)
        del owner._replicated_by

    return undo


def _set_counts(config: object, num_layers: int | None, layer_types: list | None) -> None:
    if config is None:
        return
    if num_layers is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = num_layers
    if layer_types is not None and hasattr(config, "layer_types"):
        config.layer_types = layer_types
