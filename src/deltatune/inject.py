"""Finding target modules (pure: names in, names out) and swapping adapter layers in.

`target_modules` forms: a list of name suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj"), a regex
string matched against the whole name, or "all-linear" (every linear layer except the output head).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from deltatune.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError

if TYPE_CHECKING:
    from deltatune.config import AdapterConfig

ALL_LINEAR = "all-linear"
_DEFAULT_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")


def _matches(name: str, pattern: Sequence[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The layer number in `name` ("model.layers.3.mlp" -> 3), looking under `layers_pattern` when given."""
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pat in patterns:
            m = re.match(rf"(?:.*\.)?{re.escape(pat)}\.(\d+)\.", name)
            if m:
                return int(m.group(1))
        return None
    m = _DEFAULT_LAYER_INDEX.match(name)
    return int(m.group(1)) if m else None


def close_names(wanted: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Module names (full, or their last component) that look like `wanted`."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    hits = difflib.get_close_matches(wanted, leaves, n=n, cutoff=0.5)
    if not hits:
        hits = difflib.get_close_matches(wanted, [n for n in names if n], n=n, cutoff=0.5)
    return hits


def find_targets(
    module_types: Mapping[str, type[nn.Module]],
    *,
    target_modules: Sequence[str] | str,
    supported: tuple[type[nn.Module], ...],
    exclude_modules: Sequence[str] | str | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: Sequence[str] | str | None = None,
    output_head: str | None = None,
    strict: bool = True,
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Names of the modules to adapt.

    Args:
        module_types: module name -> type (e.g. `{n: type(m) for n, m in model.named_modules()}`).
        target_modules: list of suffixes, a regex, or "all-linear".
        supported: module types the method can wrap (isinstance check).
        exclude_modules: names never adapted (suffix list or regex).
        layers_to_transform / layers_pattern: keep only these layer indices.
        output_head: the output layer's name, excluded by "all-linear".
        strict: every list entry must match a module (catches typos); loaders pass False.
        linear_types: what "all-linear" means: modules of these types (that the method supports), as in peft;
            never embeddings or convolutions, even where the method could wrap them.

    Raises:
        TargetNotFoundError: an entry (or the regex) matches no module; the message lists the closest names.
        UnsupportedModuleError: an entry matches only modules of types the method cannot wrap.
    """
    names = [n for n in module_types if n]
    if target_modules == ALL_LINEAR:
        found = [
            n
            for n in names
            if issubclass(module_types[n], linear_types) and issubclass(module_types[n], supported) and n != output_head
        ]
        if not found:
            raise TargetNotFoundError('target_modules="all-linear" found no linear layer in this model.')
    else:
        found = [n for n in names if _matches(n, target_modules)]
        _check_entries(found, names, module_types, target_modules, supported, strict)
        found = [n for n in found if issubclass(module_types[n], supported)]
    if exclude_modules:
        found = [n for n in found if not _matches(n, exclude_modules)]
    if layers_to_transform is not None:
        keep = set(layers_to_transform)
        found = [n for n in found if layer_index(n, layers_pattern) in keep]
    if not found:
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} leaves no module to adapt after exclude_modules={exclude_modules!r}, "
            f"layers_to_transform={layers_to_transform!r}; loosen one of them."
        )
    return found


def _check_entries(found, names, module_types, target_modules, supported, strict) -> None:
    if isinstance(target_modules, str):
        entries = [target_modules]
        hit = {target_modules: found}
    else:
        entries = list(target_modules)
        hit = {t: [n for n in found if n == t or n.endswith("." + t)] for t in entries}
    missing = [t for t in entries if not hit[t]]
    if missing and (strict or len(missing) == len(entries)):
        wanted = missing[0]
        guesses = close_names(wanted.split(".")[-1] if not isinstance(target_modules, str) else wanted, names)
        hint = f" Did you mean: {', '.join(guesses)}?" if guesses else ""
        raise TargetNotFoundError(
            f"target module {wanted!r} matches no module in the model.{hint} "
            f'(Entries are name suffixes, a regex string, or "all-linear".)',
            suggestions=guesses,
        )
    for t in entries:
        if hit[t] and not any(issubclass(module_types[n], supported) for n in hit[t]):
            kinds = sorted({module_types[n].__name__ for n in hit[t]})
            raise UnsupportedModuleError(
                f"target module {t!r} matches only modules of type {', '.join(kinds)}, which this method cannot "
                f"wrap (it supports {', '.join(s.__name__ for s in supported)}); target their linear children instead."
            )


def with_task_heads(model: nn.Module, config: AdapterConfig, heads: Sequence[str]) -> AdapterConfig:
    """`config` with the task's head modules (e.g. `classifier` / `score` for sequence classification) trained and
    saved as `modules_to_save`, as peft's task classes do: the heads this model has are added, and task head names
    it lacks are dropped (peft writes both names into every such config). A config without a task_type is left as
    it is."""
    if not heads or config.task_type is None:  # an adapter body without a task (e.g. loaded for a fusion)
        return config
    names = [n for n, _ in model.named_modules() if n]
    present = [h for h in heads if any(n == h or n.endswith("." + h) for n in names)]
    kept = [m for m in (config.modules_to_save or []) if m not in heads or m in present]
    kept = list(dict.fromkeys(kept))  # peft writes the heads twice into prompt-learning configs
    wanted = kept + [h for h in present if h not in kept]
    return config.replace(modules_to_save=wanted or None) if wanted != (config.modules_to_save or []) else config


def visible_module_types(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Module name -> type as the user sees it: adapter wrappers show their base layer's type, their insides are
    hidden (what target lookup matches against)."""
    from deltatune.layers import AdapterLayer, TrainableCopy

    out: dict[str, type[nn.Module]] = {}
    hidden = None  # the wrapper whose insides are skipped: named_modules walks each subtree whole, in one run
    for name, module in model.named_modules():
        if hidden is not None and name.startswith(hidden):
            continue
        hidden = None
        if isinstance(module, AdapterLayer):
            out[name] = type(module.base_layer)
            hidden = name + "."
        elif isinstance(module, TrainableCopy):
            hidden = name + "."
        else:
            out[name] = type(module)
    return out


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module called `name`."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `name` is."""
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def resolve_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> list[str]:
    """Full names of the modules listed in `modules_to_save` (suffix match); an entry that matches nothing errors."""
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for entry in modules_to_save:
        hits = [n for n in names if (n == entry or n.endswith("." + entry)) and ".modules_to_save." not in n]
        hits = [n for n in hits if ".original_module" not in n]
        if not hits:
            guesses = close_names(entry, names)
            hint = f" Did you mean: {', '.join(guesses)}?" if guesses else ""
            raise TargetNotFoundError(f"modules_to_save entry {entry!r} matches no module.{hint}", suggestions=guesses)
        # keep outermost matches only (a parent and its child both ending with the entry is ambiguous)
        out.extend(h for h in hits if not any(h.startswith(o + ".") for o in hits if o != h))
    if len(set(out)) != len(out):
        raise ConfigError(f"modules_to_save entries overlap: {modules_to_save!r}.")
    return out
