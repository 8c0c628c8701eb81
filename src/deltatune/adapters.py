"""Adapter bookkeeping on a base model's modules: wrap targets and add an adapter, remove one, set what trains,
merge, unmerge and unwrap. Functions of the base model (and the per-adapter `shared` modules), used by `PeftModel`
and never importing it; methods reach them only as `MethodSpec` data.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError, MergeError
from deltatune.inject import find_targets, replace_module, resolve_modules_to_save, visible_module_types
from deltatune.layers import AdapterLayer, TrainableCopy
from deltatune.models import linear_types, output_head_name
from deltatune.registry import MethodSpec, get_method

Wrapper = (AdapterLayer, TrainableCopy)


_FIXED: dict[int, list[tuple[str, AdapterLayer | TrainableCopy]]] = {}
"""id(base) -> its wrappers, while `fixed_structure(base)` says no module is added or replaced."""


def wrappers(base: nn.Module) -> Iterator[tuple[str, AdapterLayer | TrainableCopy]]:
    """(path, wrapper) of every adapter wrapper in `base`, outer before inner."""
    known = _FIXED.get(id(base))
    if known is not None:
        yield from known
        return
    for name, module in base.named_modules():
        if isinstance(module, Wrapper):
            yield name, module


@contextlib.contextmanager
def fixed_structure(base: nn.Module) -> Iterator[None]:
    """Within the block `base`'s wrappers are found once (a walk of every module): for a sequence of steps that
    change tensors and flags but never which modules are where (loading an adapter after its injection)."""
    if id(base) in _FIXED:  # nested: the outer block's list stands
        yield
        return
    _FIXED[id(base)] = list(wrappers(base))
    try:
        yield
    finally:
        del _FIXED[id(base)]


def adapted_layers(base: nn.Module) -> Iterator[AdapterLayer]:
    return (m for _, m in wrappers(base) if isinstance(m, AdapterLayer))


def target_names(base: nn.Module, config: AdapterConfig, spec: MethodSpec, strict: bool) -> list[str]:
    """Names of the modules the adapter wraps: the method's own choice (`select_targets`), else `target_modules`
    resolved by `find_targets`."""
    if spec.select_targets is not None:
        return spec.select_targets(base, config)
    if not config.target_modules and not config.needs_target_modules():  # e.g. only LoRA's target_parameters
        return []

    def find(target_modules, strict: bool) -> list[str]:
        return find_targets(
            visible_module_types(base),
            target_modules=target_modules,
            supported=tuple(spec.layers),
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform_list(),
            layers_pattern=config.layers_pattern,
            output_head=output_head_name(base),
            strict=strict,
            linear_types=linear_types(),
        )

    targets, saved = config.target_modules, set(config.modules_to_save or ())
    if not (strict and isinstance(targets, list) and saved & set(targets)):
        return find(targets, strict)
    # an entry also trained whole is never wrapped (modules_to_save wins), so it need not match: once an adapter
    # trains it, it is a trainable copy, and a second adapter with the same config must still apply
    named = [t for t in targets if t not in saved]
    return find(named, strict=True) if named else []


def inject(
    base: nn.Module,
    shared: nn.ModuleDict,
    adapter_name: str,
    config: AdapterConfig,
    spec: MethodSpec,
    strict: bool,
    check: Callable[[], None] | None = None,
) -> None:
    """Wrap every target and add the adapter to it, then run `check` (it raises to refuse the result); on any
    failure, undo everything this call did."""
    trainable = [(p, p.requires_grad) for p in base.parameters()]  # wrappers freeze their base: put it back on failure
    undo = spec.prepare_model(base, config) if spec.prepare_model is not None else None
    try:
        targets = target_names(base, config, spec, strict)
        saved = resolve_modules_to_save(base, config.modules_to_save or [])
        # a module trained whole is not also adapted (peft: modules_to_save wins over target_modules)
        targets = [t for t in targets if not any(t == m or t.startswith(m + ".") for m in saved)]
        extra: dict[str, nn.Module] = {}
        if spec.make_shared is not None:
            bases = [base.get_submodule(t) for t in targets]
            bases = [m.base_layer if isinstance(m, AdapterLayer) else m for m in bases]
            shared[adapter_name] = extra["shared"] = spec.make_shared(config, bases)
        for target in targets:
            module = base.get_submodule(target)
            if isinstance(module, AdapterLayer) and type(module) not in spec.layers.values():
                raise ConfigError(
                    f"{target} is already adapted by another method's adapter; one module takes one method "
                    "(choose other targets)."
                )
            if not isinstance(module, AdapterLayer):
                module = spec.layer_for(module)(module)
                replace_module(base, target, module)
            module.add_adapter(adapter_name, **spec.layer_kwargs(config, target), **extra)
        for target in saved:
            module = base.get_submodule(target)
            if not isinstance(module, TrainableCopy):
                module = TrainableCopy(module)
                replace_module(base, target, module)
            module.add_adapter(adapter_name)
        if spec.adapt_extra_modules is not None:
            spec.adapt_extra_modules(base, adapter_name, config)
        if check is not None:
            check()
    except BaseException as exc:
        remove(base, shared, adapter_name)
        if undo is not None:
            undo()
        for p, flag in trainable:
            p.requires_grad_(flag)
        if _allocation_failed(exc):
            sizes = [f"{k}={v}" for k, v in config.to_dict().items() if _large_int(v)]
            raise ConfigError(
                f"the {spec.peft_type} adapter {adapter_name!r} does not fit in memory ({str(exc).splitlines()[0]})"
                f"{'; its size fields: ' + ', '.join(sizes) if sizes else ''}. Use smaller sizes (a rank of 4-64 is "
                "usual)."
            ) from None
        raise


def _allocation_failed(exc: BaseException) -> bool:
    """Whether `exc` is torch refusing a tensor's size: out of memory, a size past int64, a storage size overflow."""
    if isinstance(exc, MemoryError):
        return True
    message = str(exc)
    if isinstance(exc, RuntimeError):
        return any(s in message for s in ("can't allocate memory", "out of memory", "size calculation overflowed"))
    return isinstance(exc, TypeError) and "Overflow when unpacking long" in message


def _large_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**16


def remove(base: nn.Module, shared: nn.ModuleDict, adapter_name: str) -> None:
    """Drop the adapter from every wrapper; wrappers left empty give their module back."""
    if adapter_name in shared:
        del shared[adapter_name]
    for name, wrapper in reversed(list(wrappers(base))):  # inner wrappers (nested) first
        wrapper.delete_adapter(adapter_name)
        if not wrapper.adapter_names:
            original = wrapper.base_layer if isinstance(wrapper, AdapterLayer) else wrapper.original_module
            replace_module(base, name, original)


def base_tensors_trained(base: nn.Module, adapter_name: str, config: AdapterConfig) -> set[str]:
    """Names of the base parameters adapter `adapter_name` trains and saves besides its own (`extra_trainable`)."""
    extra = get_method(config.peft_type).extra_trainable
    return set(extra(base, config, adapter_name)) if extra else set()


def refuse_shared_base_tensors(
    base: nn.Module, adapter_name: str, config: AdapterConfig, others: dict[str, AdapterConfig]
) -> None:
    """Refuse adapter `adapter_name` (`config`) when it would train base tensors one of `others` (the model's other
    adapters) trains too (e.g. two adapters with `bias="all"`): both would write them, and loading one would change
    the other. Disjoint sets (e.g. `bias="lora_only"` on different targets) are fine."""
    new = base_tensors_trained(base, adapter_name, config)
    for other, other_config in others.items() if new else ():
        shared = new & base_tensors_trained(base, other, other_config)
        if shared:
            raise ConfigError(
                f"adapter {adapter_name!r} would train base tensors adapter {other!r} trains and saves too "
                f"({', '.join(sorted(shared)[:3])}{', ...' if len(shared) > 3 else ''}): one set of base tensors "
                f"cannot hold both adapters' values. Set bias=\"none\" (or the method's option that trains base "
                f"tensors to off) on one of them, or put it in its own PeftModel."
            )


def set_adapter_dtype(base: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Give adapter `adapter_name`'s tensors their dtype as peft does: their base layer's floating dtype, except that
    with `autocast_adapter_dtype` a float16/bfloat16 base gets float32 adapters (stable updates of small tensors).
    A base without floating weights (quantized) keeps the adapter as created."""
    for _, wrapper in wrappers(base):
        if not isinstance(wrapper, AdapterLayer) or adapter_name not in wrapper.adapter_names:
            continue
        base_dtype = next((p.dtype for p in wrapper.get_base_layer().parameters() if p.is_floating_point()), None)
        if base_dtype is None:
            continue
        low_precision = base_dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if autocast_adapter_dtype and low_precision else base_dtype
        for p in wrapper.adapter_parameters(adapter_name):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def set_active(
    base: nn.Module, active: list[str], configs: dict[str, AdapterConfig], also_train: Iterable[str] = ()
) -> None:
    """Activate `active` in every wrapper; only their tensors (and what their method adds, e.g. biases) train, and
    those of `also_train` (adapters loaded with is_trainable=True, active or not, as in peft), unless loaded for
    inference; the base is frozen."""
    found = [w for _, w in wrappers(base)]
    for wrapper in found:
        wrapper.set_active(active)
    for p in base.parameters():
        if p.requires_grad:  # most are frozen already: skip the call
            p.requires_grad_(False)
    params = None
    for name in dict.fromkeys([*active, *also_train]):
        config = configs[name]
        if config.inference_mode:
            continue
        for wrapper in found:
            for p in wrapper.trainable_parameters(name):
                p.requires_grad_(True)
        extra = get_method(config.peft_type).extra_trainable
        for pname in extra(base, config, name) if extra else []:
            params = params or dict(base.named_parameters())  # only when the method trains base tensors
            params[pname].requires_grad_(True)


def merge(base: nn.Module, names: list[str] | None, safe_merge: bool = False, progressbar: bool = False) -> None:
    """Fold `names` (None: each layer's own active adapters, as peft merges) into the base weights; with
    `safe_merge`, every merged weight is checked for NaN/inf first."""
    layers = list(adapted_layers(base))
    chosen = {id(layer): [n for n in (layer.active_adapters if names is None else names) if n in layer.adapter_names]
              for layer in layers}  # fmt: skip
    _warn_already_merged(layers, list(dict.fromkeys(n for picked in chosen.values() for n in picked)))
    if safe_merge:
        for layer in layers:
            for name in [n for n in chosen[id(layer)] if n not in layer.merged_adapters]:
                with torch.no_grad():
                    finite = torch.isfinite(layer.compose_unrecorded(name, layer.base_weight.float())).all()
                if not finite:
                    raise MergeError(
                        f"NaNs detected in the merged weights: adapter {name!r} gives non-finite values; nothing was "
                        "merged."
                    )
    if progressbar:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="merging")
    for layer in layers:
        layer.merge(adapter_names=chosen[id(layer)])


def _warn_already_merged(layers: list[AdapterLayer], names: list[str]) -> None:
    """Warn (as peft does, once per call here) when some or all of `names` are merged already: a second merge of an
    adapter is a no-op, and merging on top of merged adapters stacks them."""
    merged = list(dict.fromkeys(n for layer in layers for n in layer.merged_adapters))
    if not merged:
        return
    new = [n for n in names if any(n in layer.adapter_names and n not in layer.merged_adapters for layer in layers)]
    if not new:
        warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=3)
    else:
        warnings.warn(
            f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
            f"{','.join(new)}.",
            UserWarning,
            stacklevel=3,
        )


def unmerge(base: nn.Module) -> None:
    for layer in adapted_layers(base):
        layer.unmerge()


def unwrap(base: nn.Module, shared: nn.ModuleDict, keep_copies: bool) -> nn.Module:
    """`base` with every wrapper replaced by its module (trained whole copies kept, or the originals)."""
    for name, wrapper in reversed(list(wrappers(base))):  # inner wrappers (nested) first
        if isinstance(wrapper, AdapterLayer):
            replace_module(base, name, wrapper.base_layer)
        else:
            replace_module(base, name, wrapper.selected() if keep_copies else wrapper.original_module)
    for name in list(shared):
        del shared[name]
    return base
