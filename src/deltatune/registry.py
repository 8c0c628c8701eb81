"""The method registry: the only place the core learns which methods exist.

A method module builds one `MethodSpec` and calls `register_method` at import time; `PeftModel`, injection and
checkpoint io look methods up here by `peft_type` and never name one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from torch import Tensor, nn

from deltatune.errors import ConfigError, UnknownMethodError

if TYPE_CHECKING:
    from deltatune.config import AdapterConfig
    from deltatune.layers import AdapterLayer


class MethodHooks(Protocol):
    """Training-time behaviour a method may add; the trainer calls these and nothing else.

    extra_loss(model) is added to every step's objective (split over its micro-batches); on_step(model, step) runs
    after the optimizer update and before gradients are cleared (steps count from 0). state_dict / load_state_dict
    carry whatever the hooks accumulate across steps (e.g. importance averages) through training checkpoints.
    """

    def on_step(self, model: nn.Module, step: int) -> None: ...

    def extra_loss(self, model: nn.Module) -> Any: ...

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]: ...

    def load_state_dict(self, model: nn.Module, tensors: dict[str, Tensor]) -> None: ...


LayerFactory = Callable[..., "AdapterLayer"]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the core needs to know about one method.

    Attributes:
        peft_type: the `peft_type` string written in `adapter_config.json` (peft's value where peft has the method).
        config_cls: the method's `AdapterConfig` subclass.
        kind: "layer" (wraps modules) or "input" (changes what flows into the model: virtual tokens, key/value
            prefixes; its wrapper is a `deltatune.input_adapter.InputAdapter`).
        layers: ordered dispatch table, base module type -> wrapper class; the first `isinstance` match wins,
            so specific (e.g. quantized) types come first.
        layer_kwargs: turns (config, module path) into the flat keyword arguments of `add_adapter` for that target.
        param_prefix: prefix of the method's parameter attributes (e.g. "lora_"), used in reports.
        extra_trainable: optional, (model, config, adapter name) -> names of base parameters the method also trains
            with that adapter (LoRA's bias); two adapters may not share one (`PeftModel` refuses the second).
        hooks: optional training hooks.
        make_shared: optional builder of per-adapter tensors shared by all its layers.
    """

    peft_type: str
    config_cls: type[AdapterConfig]
    kind: Literal["layer", "input"]
    layers: Mapping[type[nn.Module], type[AdapterLayer]]
    layer_kwargs: Callable[[AdapterConfig, str], dict[str, Any]]
    param_prefix: str
    extra_trainable: Callable[[nn.Module, AdapterConfig, str], list[str]] | None = None
    hooks: MethodHooks | None = None
    default_targets: Callable[[str], list[str] | str | None] = field(default=lambda model_type: None)
    make_shared: Callable[[AdapterConfig, list[nn.Module]], nn.Module] | None = None
    """Optional: builds the tensors all of an adapter's layers share (from the config and the target modules); the
    module is handed to each layer's `add_adapter(shared=...)`, and its persistent buffers are saved as
    `base_model.<name>` (peft's key for e.g. VeRA's projections)."""
    with_defaults: Callable[[AdapterConfig, str | None], AdapterConfig] | None = None
    """Optional: (config, model_type) -> the config with its model-family defaults filled in, where more than
    `target_modules` depends on the family (e.g. which targets are feed-forward); replaces `default_targets`."""
    prepare_model: Callable[[nn.Module, AdapterConfig], Callable[[], None]] | None = None
    """Optional: (model, config) changes the model's structure before the targets are looked up (e.g. replicates
    layers) and returns a function that undoes it, which the core calls if adding the adapter fails."""
    adapt_extra_modules: Callable[[nn.Module, str, AdapterConfig], None] | None = None
    """Optional: (model, adapter name, config) wraps modules the method adapts besides `target_modules` (e.g. some
    rows of an embedding), with `AdapterLayer`s so the core manages them like the rest; called after the targets,
    inside the same undo-on-failure."""
    relative_to_initial: (
        Callable[[AdapterConfig, dict[str, Tensor], dict[str, Tensor]], tuple[AdapterConfig, dict[str, Tensor]]] | None
    ) = None
    """Optional: (config, trained tensors, tensors saved right after init) -> an adapter of this method that adds
    the same change to the *original* base, for inits that rewrite the base (`save_pretrained`'s
    `path_initial_model_for_weight_conversion`, peft's name)."""

    input_context: (
        Callable[[nn.Module, tuple, dict[str, Any], bool], contextlib.AbstractContextManager[None]] | None
    ) = None
    """Optional: (model, call args, call kwargs, generating) -> a context entered around each `forward` /
    `generate` of the PeftModel: it may rewrite the keyword arguments in place (pop those the method consumes,
    `input_names`; prepend virtual tokens) and tell the method's layers about this call (e.g. which positions ReFT
    edits). It may yield a function that the output of `generate` is passed through (e.g. to drop added columns).
    With it, positional arguments reach the call as keywords (`bind_inputs`)."""
    combine: Callable[..., None] | None = None
    """Optional: (model, adapters, weights, adapter_name, **options) adds a new adapter combining existing ones
    (`PeftModel.add_weighted_adapter`, peft's signature)."""
    fill_from_model: Callable[[AdapterConfig, nn.Module], AdapterConfig] | None = None
    """Optional: (config, model) -> the config with fields that follow from the model's sizes filled in (peft fills
    e.g. the hidden size and layer count of prompt methods from the model's config and saves them)."""
    select_targets: Callable[[nn.Module, AdapterConfig], list[str]] | None = None
    """Optional: (model, config) -> names of the modules to wrap, when the method picks them itself from the model
    (e.g. its input embedding, or the top blocks' attention) instead of through `target_modules`."""
    mergeable: bool = True
    """False where an adapter is not a change of weights (non-linear or position-dependent terms, virtual tokens):
    merging is refused, and tools that need a merge say so up front."""
    module_key_prefix: str = "base_model.model."
    """peft's prefix of module keys in this method's files: its tuner level (`base_model.model.`) for layer methods;
    prompt-learning methods, which have no tuner level, save modules (a task head) under `base_model.`."""
    input_names: tuple[str, ...] = ()
    """Keyword arguments of forward / generate that the method consumes (a trainer passes them when it has them)."""

    def complete(self, config: AdapterConfig, model: nn.Module) -> AdapterConfig:
        """`config` with the model's sizes (`fill_from_model`) and its family's defaults filled in (`with_defaults`,
        else `default_targets`)."""
        from deltatune.models import model_type_of

        if self.fill_from_model is not None:
            config = self.fill_from_model(config, model)
        model_type = model_type_of(model)
        if self.with_defaults is not None:
            return self.with_defaults(config, model_type)
        if config.target_modules is not None:
            return config
        targets = self.default_targets(model_type)
        if targets is None and not config.needs_target_modules():  # e.g. LoRA on target_parameters alone (peft)
            return config
        if targets is None:
            raise ConfigError(self._no_default_targets(model, model_type))
        return config.replace(target_modules=targets)

    def _no_default_targets(self, model: nn.Module, model_type: str | None) -> str:
        """The error for a missing `target_modules`, naming what could be chosen on this model."""
        from deltatune.models import linear_types

        adaptable = tuple(self.layers) or (nn.Module,)
        names = [n for n, m in model.named_modules() if n and isinstance(m, adaptable)]
        suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
        has_linear = any(isinstance(m, linear_types()) for m in model.modules())
        choices = f"module names it can adapt here: {suffixes[:12]}" if suffixes else "no module here it can adapt"
        return (
            f"Please specify `target_modules`: {self.peft_type} has no default targets for "
            f"{model_type or type(model).__name__} models ({choices}"
            + ('; or "all-linear" for every linear layer but the output head' if has_linear else "")
            + ")."
        )

    def layer_for(self, module: nn.Module) -> type[AdapterLayer] | None:
        """The wrapper class for `module`, or None if this method cannot adapt its type."""
        for base_type, layer_cls in self.layers.items():
            if isinstance(module, base_type):
                return layer_cls
        return None


def call_context(
    specs: list[MethodSpec], model: nn.Module, args: tuple, kwargs: dict[str, Any], generating: bool
) -> contextlib.AbstractContextManager[Callable[[Any], Any] | None]:
    """The methods' contexts around one forward / generate call (`MethodSpec.input_context`); it yields the
    composition of the functions they yield for `generate()`'s output (None if none does). Methods without a
    context (most) cost a no-op on this hot path."""
    with_context = [spec for spec in specs if spec.input_context is not None]
    if not with_context:
        return contextlib.nullcontext()
    with_context.sort(key=lambda spec: spec.kind != "input")  # the input first: others see the whole input
    return _entered(with_context, model, args, kwargs, generating)


@contextlib.contextmanager
def _entered(
    specs: list[MethodSpec], model: nn.Module, args: tuple, kwargs: dict[str, Any], generating: bool
) -> Iterator[Callable[[Any], Any] | None]:
    with contextlib.ExitStack() as stack:
        finishers = [stack.enter_context(spec.input_context(model, args, kwargs, generating)) for spec in specs]
        finishers = [f for f in finishers if f is not None]

        def finish(outputs: Any) -> Any:
            for function in finishers:
                outputs = function(outputs)
            return outputs

        yield finish if finishers else None


def bind_inputs(
    specs: list[MethodSpec], function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for a call of `function`; for methods with an `input_context`, positional arguments are moved
    to their keyword names (so the contexts see and may rewrite all of them)."""
    if not args or all(spec.input_context is None for spec in specs):
        return args, kwargs
    bound = inspect.signature(function).bind_partial(*args)
    return (), {**bound.arguments, **kwargs}


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method; its module calls this once at import. Re-registering the same type replaces it."""
    _METHODS[spec.peft_type] = spec
    return spec


def register_layer(peft_type: str, base_type: type[nn.Module], layer_cls: type[AdapterLayer]) -> None:
    """Teach a method to wrap another base module type (e.g. a quantized linear); it is tried before the others."""
    spec = get_method(peft_type)
    table = {base_type: layer_cls, **{k: v for k, v in spec.layers.items() if k is not base_type}}
    _METHODS[peft_type] = dataclasses.replace(spec, layers=table)


def get_method(peft_type: str) -> MethodSpec:
    """The spec for `peft_type`; an unknown type lists the known ones."""
    _ensure_loaded()
    if not isinstance(peft_type, str):
        raise UnknownMethodError(f"peft_type must be a method name (a string), got {peft_type!r}.")
    try:
        return _METHODS[peft_type]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise UnknownMethodError(f"unknown peft_type {peft_type!r}; deltatune provides: {known}.") from None


def list_methods() -> list[MethodSpec]:
    """Every registered method, sorted by peft_type."""
    _ensure_loaded()
    return [_METHODS[k] for k in sorted(_METHODS)]


def spec_for_config(config: AdapterConfig) -> MethodSpec:
    """The spec whose config class `config` is."""
    spec = get_method(config.peft_type)
    if not isinstance(config, spec.config_cls):
        raise UnknownMethodError(f"{type(config).__name__} is not the config class of {spec.peft_type}.")
    return spec


def _ensure_loaded() -> None:
    import deltatune.methods  # noqa: F401  (registers every bundled method)
