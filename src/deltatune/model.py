"""`PeftModel`: the façade over a base model with named adapters (add, switch, disable, delete, merge, save, load).

It knows methods only through the registry (`MethodSpec`) and adapter wrappers only through `AdapterLayer` /
`TrainableCopy`; it never names a method or a model family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune import adapters, saving
from deltatune.adapter_model import register_task_class, task_class
from deltatune.arguments import refuse_unknown
from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, ConfigError
from deltatune.facade import PretrainedFacade, Tuner
from deltatune.inject import (
    with_task_heads,
)
from deltatune.layers import AdapterLayer, TrainableCopy
from deltatune.mixed_batch import adapters_per_row
from deltatune.model_checkpoint import CheckpointMixin
from deltatune.registry import MethodHooks, MethodSpec, bind_inputs, call_context, get_method, spec_for_config


class PeftModel(CheckpointMixin, PretrainedFacade):
    """A base model plus named adapters. `forward` and `generate` pass through to the (modified) base model.

    `model.base_model` is peft's tuner level (`model.base_model.model` is the transformers model); for transformers'
    and other libraries' code the wrapper reads as the wrapped `PreTrainedModel` (`deltatune.facade`).
    """

    task_heads: tuple[str, ...] = ()
    """Head modules a task class trains and saves with every adapter (`modules_to_save`), as peft's do."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: AdapterConfig | None = None,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ):
        nn.Module.__init__(self)  # not PreTrainedModel's: the wrapped model keeps the one config
        self._modules["base_model"] = Tuner(
            model, owner=self
        )  # under the `base_model` property (PreTrainedModel has one)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.shared = nn.ModuleDict()  # per adapter: tensors all its layers share (only for methods that have some)
        self._active: list[str] = []
        self._loaded_trainable: set[str] = set()
        """Adapters loaded with is_trainable=True: they train whether active or not (peft's rule)."""
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype, low_cpu_mem_usage)

    # -- pass-through -------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; `adapter_names` (one per row, "__base__" for none) mixes adapters in a batch."""
        specs = self._specs()
        args, kwargs = bind_inputs(specs, self._base.forward, args, kwargs)
        with adapters_per_row(self, adapter_names), call_context(specs, self._base, args, kwargs, False):
            outputs = self._base(*args, **kwargs)
        hooks = self._hooks()
        loss = getattr(outputs, "loss", None)
        if hooks is not None and self.training and isinstance(loss, Tensor):
            # the method's regulariser joins a loss the model computed itself (labels given), as peft does
            outputs.loss = loss + hooks.extra_loss(self)
        return outputs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        names, specs = kwargs.pop("adapter_names", None), self._specs()
        args, kwargs = bind_inputs(specs, self._base.generate, args, kwargs)
        with adapters_per_row(self, names), call_context(specs, self._base, args, kwargs, generating=True) as finish:
            outputs = self._base.generate(*args, **kwargs)
        return outputs if finish is None else finish(outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Keyword arguments of forward / generate this model's methods consume besides the base model's."""
        return tuple(dict.fromkeys(n for spec in self._specs() for n in spec.input_names))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_model" or "_modules" not in self.__dict__:
                raise
            return getattr(self._modules["base_model"], name)  # the tuner, then the model: lm_head, model, ...

    @property
    def base_model(self) -> Tuner:
        """peft's tuner level: `.model` is the transformers model (see `deltatune.facade.Tuner`)."""
        return self._modules["base_model"]

    @property
    def _base(self) -> nn.Module:
        return self._modules["base_model"]._modules["model"]

    def get_base_model(self) -> nn.Module:
        """The transformers model itself, adapters inside."""
        return self._base

    # -- training hooks -----------------------------------------------------------------------------------------------
    def _specs(self) -> list[MethodSpec]:
        """The methods of this model's adapters: at most one of each kind (`_check_same_method`)."""
        return [get_method(t) for t in dict.fromkeys(c.peft_type for c in self.peft_config.values())]

    def _spec(self) -> MethodSpec | None:
        """The model's layer method (whose hooks and combinations apply), else its only method."""
        specs = self._specs()
        return next((s for s in specs if s.kind == "layer"), specs[0] if specs else None)

    def _hooks(self) -> MethodHooks | None:
        return getattr(self._spec(), "hooks", None)

    def update_and_allocate(self, global_step: int) -> None:
        """The method's per-step training hook (AdaLoRA: importance scores, rank re-allocation; else a no-op): in your
        own loop after `optimizer.step()`, before `zero_grad()`, steps from 0 (deltatune's trainer calls it)."""
        if (hooks := self._hooks()) is not None:
            hooks.on_step(self, global_step)

    def training_state_dict(self) -> dict[str, Tensor]:
        """What a resumed run needs besides the optimizer (`saving.training_state`)."""
        return saving.training_state(self, self._hooks())

    def load_training_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore `training_state_dict()` output; parameter names and shapes are checked before anything changes."""
        saving.load_training_state(self, self._hooks(), tensors)

    # -- adapter bookkeeping ------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        return self._active[0] if self._active else None

    @property
    def active_peft_type(self) -> str | None:
        """The method of this model's adapters (one method per model)."""
        return self.peft_config[self._active[0]].peft_type if self._active else None

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True when an adapter is active and adapters are not turned off (`disable_adapter()`), as peft's."""
        return bool(self._active) and not any(w.disabled for _, w in self._wrappers())

    @property
    def prefix(self) -> str:
        """What the active method's parameter names contain (peft's tuner `prefix`, e.g. "lora_")."""
        return get_method(self.active_peft_type).param_prefix if self.active_peft_type else ""

    def _wrappers(self) -> Iterator[tuple[str, AdapterLayer | TrainableCopy]]:
        return adapters.wrappers(self._base)

    def _layers(self) -> Iterator[AdapterLayer]:
        return adapters.adapted_layers(self._base)

    def _check_name(self, adapter_name: str, *, exists: bool) -> None:
        if exists and adapter_name not in self.peft_config:
            raise AdapterError(  # peft's wording first: code written against peft matches on it
                f"Adapter {adapter_name} does not exist: this model has {sorted(self.peft_config)}."
            )
        if not exists:
            if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
                raise AdapterError(f"adapter name {adapter_name!r} must be a non-empty string without dots.")
            if adapter_name in self.peft_config:
                raise AdapterError(  # peft's wording first
                    f"Adapter with name {adapter_name!r} already exists; delete it first or pick another name."
                )

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: AdapterConfig,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Add a new (trainable) adapter; the first one added becomes active. The model keeps `peft_config` itself,
        completed (e.g. with the model's default `target_modules`), as peft does. The adapter's tensors take their
        base layers' dtype, except float32 over a float16/bfloat16 base unless `autocast_adapter_dtype=False`.

        Raises:
            UnsupportedArgumentError: `low_cpu_mem_usage=True` (peft's empty adapter on the meta device, to be
                filled by a later load): deltatune creates every adapter with its values.
        """
        refuse_unknown("add_adapter", {"low_cpu_mem_usage": low_cpu_mem_usage}, {"low_cpu_mem_usage": (False,)})
        self._check_name(adapter_name, exists=False)
        spec = spec_for_config(peft_config)
        completed = with_task_heads(self._base, spec.complete(peft_config, self._base), self.task_heads)
        self._check_same_method(spec)
        self._inject(adapter_name, completed, spec, strict=True)
        self._initialize_from_base(adapter_name)
        adapters.set_adapter_dtype(self._base, adapter_name, autocast_adapter_dtype)
        self.peft_config[adapter_name] = peft_config.update_from(completed)
        if not self._active:
            self._active = [adapter_name]
        self._apply_active()

    def _check_same_method(self, spec: MethodSpec) -> None:
        """One method per kind: adapters of one layer method, and of one input method (virtual tokens) beside it."""
        same_kind = {s.peft_type for s in self._specs() if s.kind == spec.kind}
        if same_kind and same_kind != {spec.peft_type}:
            raise ConfigError(
                f"this model holds {sorted(same_kind)} adapters; a {spec.peft_type} adapter needs its own PeftModel "
                f"(or merge_and_unload() the current ones first). A model holds one layer method and one input "
                f"method at most."
            )

    def _inject(self, adapter_name: str, config: AdapterConfig, spec: MethodSpec, strict: bool) -> None:
        """Add the adapter's layers; refused (and undone) when it would train base tensors another adapter trains."""
        others = {n: c for n, c in self.peft_config.items() if n != adapter_name}

        def check() -> None:
            adapters.refuse_shared_base_tensors(self._base, adapter_name, config, others)

        adapters.inject(self._base, self.shared, adapter_name, config, spec, strict, check)

    def _remove_from_modules(self, adapter_name: str) -> None:
        adapters.remove(self._base, self.shared, adapter_name)

    def set_adapter(
        self, adapter_name: str | list[str], inference_mode: bool | None = None, weights: list[float] | None = None
    ) -> None:
        """Make one adapter, or several (their terms add up), active; merged weights are unmerged. They train unless
        loaded for inference; `inference_mode=True` freezes them, `False` makes them trainable. `weights` (one per
        adapter; LoRA-family methods): each adapter's scale becomes weight x its configured scale, as diffusers'
        `set_adapters(names, adapter_weights)` mixes styles; without `weights` the scales stay as they are."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterError("set_adapter needs at least one adapter name.")
        for name in names:
            self._check_name(name, exists=True)
        if weights is not None and len(weights) != len(names):
            raise AdapterError(f"set_adapter got {len(weights)} weights for {len(names)} adapters {names}.")
        copies = ((path, w) for path, w in self._wrappers() if isinstance(w, TrainableCopy))
        for path, wrapper in copies:
            owners = [n for n in names if n in wrapper.modules_to_save]
            if len(owners) > 1:  # a copy trained whole replaces the module: two cannot add up, one would be ignored
                raise AdapterError(
                    f"Only one adapter can be set at a time for ModulesToSaveWrapper: {path} is trained whole "
                    f"(modules_to_save) by {owners}, and such copies do not add up. Activate one of them, or give "
                    "the adapters different modules_to_save."
                )
        if any(layer.merged for layer in self._layers()):
            self.unmerge_adapter()
        if inference_mode is not None:
            for name in names:
                self.peft_config[name].inference_mode = inference_mode  # in the user's object, as peft does
        self._active = names
        self._apply_active()
        if weights is not None:
            for layer in self._layers():
                for name, weight in zip(names, weights, strict=True):
                    layer.set_scale(name, float(weight))

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the given adapters' tensors trainable or frozen, whether active or not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_name(name, exists=True)
            for _, wrapper in self._wrappers():
                for p in wrapper.trainable_parameters(name):
                    p.requires_grad_(requires_grad)

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self._base, "dtype", None)

    def _apply_active(self) -> None:
        also = [n for n in self.peft_config if n in self._loaded_trainable]
        adapters.set_active(self._base, self._active, self.peft_config, also)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kw: Any) -> None:
        """A new adapter combining `adapters` with `weights` (peft's signature; its method's `combine` builds it)."""
        combine = getattr(self._spec(), "combine", None)
        if combine is None:
            raise ConfigError("this model's method has no weighted combination of adapters (LoRA has).")
        combine(self, adapters, weights, adapter_name, **kw)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; modules left without adapters become their original selves again."""
        self._check_name(adapter_name, exists=True)
        if any(adapter_name in layer.merged_adapters for layer in self._layers()):
            raise AdapterError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. "
                "(unmerge_adapter() does, then delete it.)"
            )
        self._remove_from_modules(adapter_name)
        del self.peft_config[adapter_name]
        self._loaded_trainable.discard(adapter_name)
        self._active = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
        self._apply_active()

    @property
    def active_peft_config(self) -> AdapterConfig:
        """The config of the (first) active adapter."""
        if not self._active:
            raise AdapterError("this model has no active adapter.")
        return self.peft_config[self._active[0]]

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off until `enable_adapter_layers()` (merged adapters are unmerged first); the context
        manager `disable_adapter()` does the same for one block."""
        if any(layer.merged for layer in self._layers()):
            self.unmerge_adapter()
        found = [w for _, w in self._wrappers()]
        if not self.__dict__.get("_grad_while_enabled"):  # a second disable keeps the first one's record
            # an adapter that is off does not train (peft turns its gradients off too); enabling restores each flag
            params = [p for w in found for name in w.adapter_names for p in w.adapter_parameters(name)]
            self.__dict__["_grad_while_enabled"] = [(p, p.requires_grad) for p in params]
            for p in params:
                p.requires_grad_(False)
        for wrapper in found:
            wrapper.disabled = True

    def enable_adapter_layers(self) -> None:
        for _, wrapper in self._wrappers():
            wrapper.disabled = False
        for p, requires_grad in self.__dict__.pop("_grad_while_enabled", None) or []:
            p.requires_grad_(requires_grad)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (merged adapters are unmerged first); the adapters' tensors do
        not train inside it. After it, every layer is on or off as it was before, layer by layer (peft turns every
        layer on when some were off, with a warning)."""
        states = [(wrapper, wrapper.disabled) for _, wrapper in self._wrappers()]
        had_record = "_grad_while_enabled" in self.__dict__
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if not any(disabled for _, disabled in states):
                self.enable_adapter_layers()
            else:
                for wrapper, disabled in states:
                    wrapper.disabled = disabled
                if not had_record:  # this block froze the adapters' tensors: give each its flag back
                    for param, requires_grad in self.__dict__.pop("_grad_while_enabled", None) or []:
                        param.requires_grad_(requires_grad)

    # -- merging ------------------------------------------------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, progressbar: bool = False
    ) -> None:
        """Fold adapters (default: each layer's active ones, which are the model's unless a layer's were set on
        it directly, as peft merges) into the base weights; `unmerge_adapter` undoes it exactly.

        With `safe_merge`, every layer's merged weight is computed and checked for NaN/inf before any is written.
        """
        names = None if adapter_names is None else list(adapter_names)
        for name in names or []:
            self._check_name(name, exists=True)
        adapters.merge(self._base, names, safe_merge, progressbar)

    def unmerge_adapter(self) -> None:
        adapters.unmerge(self._base)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge, then return the plain base model with every wrapper removed (no added inference latency);
        `progressbar` shows the layers as they merge."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge, progressbar=progressbar)
        return self._unwrap(keep_copies=True)

    def unload(self) -> nn.Module:
        """Return the original base model: adapters removed without merging."""
        self.unmerge_adapter()
        return self._unwrap(keep_copies=False)

    def _unwrap(self, keep_copies: bool) -> nn.Module:
        adapters.unwrap(self._base, self.shared, keep_copies)
        self.peft_config.clear()
        self._active = []
        return self._base

    # -- reports ------------------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, adapters included in `all` (peft's definition); weights a module
        stores in another form (e.g. 4-bit buffers) count through its `stored_weight_numel`."""
        params = list(self.parameters())
        stored = sum(getattr(m, "stored_weight_numel", 0) for m in self.modules())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + stored

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def inject_adapter_in_model(peft_config: AdapterConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Add an adapter's layers to `model` in place, without the PeftModel wrapper (peft's function); the model is
    returned, its base weights frozen and the adapter active, with the configs as `model.peft_config` (as peft
    does: `get_peft_model_state_dict(model)` reads them). Methods whose state lives outside the layers (tensors all
    layers share, virtual tokens) need the wrapper and are refused by name before the model changes."""
    spec = spec_for_config(peft_config)
    if spec.kind != "layer" or spec.make_shared is not None:
        raise ConfigError(
            f"`inject_adapter_in_model` does not support {peft_config.peft_type} because it uses shared state (tensors "
            "all its layers share, or virtual tokens) that lives outside the adapted layers. Please use "
            "`get_peft_model` instead."
        )
    wrapper = PeftModel(model, peft_config, adapter_name)
    base = wrapper.get_base_model()
    base.peft_config = wrapper.peft_config
    return base


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (its base weights are frozen). With a
    `task_type`, the result is that task's class (e.g. `PeftModelForCausalLM`), as in peft. `revision` is recorded
    in the config (the base model's revision); `autocast_adapter_dtype` and `low_cpu_mem_usage` as in `add_adapter`.

    Raises:
        UnsupportedArgumentError: `mixed=True` (peft's PeftMixedModel of different methods): one layer method and
            one input method already share a deltatune model; build one PeftModel per other method.
    """
    refuse_unknown("get_peft_model", {"mixed": mixed}, {"mixed": (False,)})
    if revision is not None:
        peft_config.revision = revision
    cls = task_class(peft_config.task_type)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)


register_task_class(None, PeftModel)


def load_config(model_id: str | Path) -> AdapterConfig:
    """Read and validate a saved adapter's config without touching any model."""
    return AdapterConfig.from_pretrained(model_id)
