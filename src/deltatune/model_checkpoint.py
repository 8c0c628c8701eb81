"""`PeftModel`'s checkpoint half: save and load adapters (peft's files), as a mixin of `deltatune.model.PeftModel`.

Like the model, it knows methods only through the registry and wrappers only through their state API.
"""

from __future__ import annotations

import warnings
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from deltatune import adapters, io, saving
from deltatune.adapter_model import dispatches_on_task_type, task_class
from deltatune.arguments import flag, refuse_unknown
from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError, UnsupportedArgumentError
from deltatune.hub import adapter_dir, push_adapter, write_model_card
from deltatune.inject import with_task_heads
from deltatune.layers import AdapterLayer
from deltatune.registry import get_method, spec_for_config
from deltatune.state_dict import LoadResult

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""Target names that make `save_embedding_layers="auto"` save the embedding tables (peft's list)."""


class CheckpointMixin:
    """save_pretrained / from_pretrained / load_adapter and the tensors behind them."""

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """Adapter `adapter_name`'s tensors under peft's saved keys."""
        relative: dict[str, Tensor] = {}
        for path, wrapper in self._wrappers():
            state = wrapper.adapter_state(adapter_name)
            relative.update({_in_model(path, k): t for k, t in state.items()})
        config = self.peft_config[adapter_name]
        extra = get_method(config.peft_type).extra_trainable
        if extra:
            params = dict(self._base.named_parameters())
            relative.update({n: params[n] for n in extra(self._base, config, adapter_name)})
        if adapter_name in self.shared:
            relative.update({io.SHARED_MARK + k: t for k, t in self.shared[adapter_name].state_dict().items()})
        return io.to_peft_keys(relative, self._module_prefix(config))

    @staticmethod
    def _module_prefix(config: AdapterConfig) -> str:
        return get_method(config.peft_type).module_key_prefix

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        state_dict: dict[str, Tensor] | None = None,
        path_initial_model_for_weight_conversion: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` per adapter ("default" at the top, others in
        `save_directory/<name>/`), atomically; see `deltatune.saving`. `state_dict`: tensors instead of the live
        ones, as the model's `state_dict()` (peft's meaning; Trainer passes it) or one adapter's peft-keyed tensors.
        `is_main_process=False` writes nothing. `path_initial_model_for_weight_conversion`: where the adapter was
        saved right after an init that rewrote the base; it is then saved relative to the original base.

        Raises:
            UnsupportedArgumentError: `safe_serialization=False` (deltatune writes safetensors only) or a keyword
                argument deltatune does not implement.
        """
        embedding_setting = kwargs.pop("save_embedding_layers", "auto")
        refuse_unknown("save_pretrained", kwargs, {})
        if embedding_setting not in ("auto", True, False):
            raise UnsupportedArgumentError(
                f"save_embedding_layers={embedding_setting!r}: use 'auto' (when target_modules names embed_tokens or "
                "lm_head), True or False."
            )
        if not safe_serialization:
            raise UnsupportedArgumentError(
                "safe_serialization=False asks for a pickled adapter_model.bin; deltatune writes safetensors only "
                "(loadable by peft and every other tool): drop the argument."
            )
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_name(name, exists=True)
        if is_main_process:
            initial = path_initial_model_for_weight_conversion
            embeddings = {name: self._embedding_tensors(name, embedding_setting) for name in names}
            saving.save_adapters(self, Path(save_directory), names, state_dict, initial, embeddings)

    def _embedding_tensors(self, adapter_name: str, setting: bool | str) -> dict[str, Tensor]:
        """The model's input / output embedding weights saved beside adapter `adapter_name` (peft's
        `save_embedding_layers`): with True, or with "auto" when its target_modules name an embedding layer (e.g.
        after resizing the vocabulary for new tokens: the adapter then carries the table it was trained with)."""
        targets = self.peft_config[adapter_name].target_modules or []
        named = any(k in targets for k in EMBEDDING_LAYER_NAMES)  # peft's test: an entry, or a substring of a regex
        if setting is False or (setting == "auto" and not named):
            return {}
        if setting == "auto":
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`: the full "
                "embedding table is saved with the adapter (save_embedding_layers=False leaves it out).",
                stacklevel=3,
            )
        return io.to_peft_keys(self._embedding_weights(), self._module_prefix(self.peft_config[adapter_name]))

    def _embedding_weights(self) -> dict[str, Tensor]:
        """The model's input and output embedding weights under their state keys (`<path>.base_layer.weight` when
        an adapter wraps the layer); none, with a warning, for a model that does not say which they are."""
        if not callable(getattr(self._base, "get_input_embeddings", None)):
            warnings.warn(
                "Could not identify embedding layer(s) because the model is not a 🤗 transformers model. "
                "(It has no get_input_embeddings): nothing beyond the adapter is saved.",
                stacklevel=4,
            )
            return {}
        return {key: weight.detach() for key, weight in self._embedding_params().items()}

    def _embedding_params(self) -> dict[str, Tensor]:
        """The input / output embeddings' weight parameters under their state keys: `<path>.base_layer.weight`
        where an adapter wraps the layer, `<path>.weight` where none does."""
        layers = _embedding_layers(self._base)
        found = {}
        for path, module in self._base.named_modules():
            wrapped = isinstance(module, AdapterLayer)
            inner = module.get_base_layer() if wrapped else module
            if path and any(inner is layer for layer in layers):
                found.setdefault(f"{path}.base_layer.weight" if wrapped else f"{path}.weight", inner.weight)
        return found

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """What `save_pretrained` never writes: every state-dict key but the adapters' (transformers reads this)."""
        return saving.frozen_keys(self)

    def create_or_update_model_card(self, output_dir: str | Path, adapter_name: str | None = None) -> None:
        """Write or update `output_dir/README.md` (the Hub's model card header: library, base model, tags)."""
        config = self.peft_config[adapter_name or self.active_adapter]
        is_transformers = isinstance(self._base, PreTrainedModel)
        # a Hub base model only for a base that has a model config (as peft): a custom module's name is no repo id
        base = self._base_path(config) if getattr(self._base, "config", None) is not None else None
        write_model_card(Path(output_dir), base, config.peft_type, is_transformers)

    def _base_path(self, config: AdapterConfig) -> str | None:
        """Where the base model lives: the config's `base_model_name_or_path`, else the model config's name."""
        return (
            config.base_model_name_or_path
            or getattr(getattr(self._base, "config", None), "_name_or_path", None)
            or None
        )

    def push_to_hub(self, repo_id: str, selected_adapters: list[str] | None = None, **kwargs: Any) -> object:
        """Upload the adapters' files (as `save_pretrained` writes them; never the base model) to the Hub repo
        `repo_id`. Keywords: private, token, revision, commit_message, create_pr."""
        save = lambda folder: self.save_pretrained(folder, selected_adapters=selected_adapters)  # noqa: E731
        return push_adapter(save, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a saved adapter (deltatune's or peft's) onto `model`; on any error the model is left unchanged. For
        inference (`is_trainable=False`) in eval mode, nothing trainable; `is_trainable=True`: training mode, adapter
        trainable. `config` replaces the directory's adapter_config.json; `subfolder` reads `model_id/subfolder`.
        """
        directory = adapter_dir(model_id, kwargs.get("subfolder"), kwargs.get("revision"))
        with io.folder_lock(directory, exclusive=False):  # the config and the weights of one save (see saving.py)
            if config is None:  # read once here: its task_type picks the class, and load_adapter takes it as given
                config = AdapterConfig.from_pretrained(directory)
            if dispatches_on_task_type(cls):  # PeftModel: peft returns the class of the adapter's task_type
                cls = task_class(config.task_type)
            peft_model = cls(model)
            peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable, config=config, **kwargs)
        peft_model.train(is_trainable)
        return peft_model

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        """Add the adapter saved in `model_id` (or `model_id/subfolder`) under `adapter_name`; validated fully before
        the model changes. `model_id` is a local folder or a Hub repo id (`revision=` picks its version; read
        through huggingface_hub's cache). `config` replaces the saved adapter_config.json (same method); the model
        keeps that object, with `inference_mode = not is_trainable`, as peft does. peft's loading keywords:
        `torch_device` (where the file is read into; the adapter's tensors then live with their base layers),
        `device_map` (the model's placement; adapters follow their layers), `autocast_adapter_dtype` (as in
        `add_adapter`), `low_cpu_mem_usage` (either value: no random init is built) and `ignore_mismatched_sizes`.

        Raises:
            ConfigError / UnsupportedFieldError / UnknownMethodError: the config is malformed or asks for more than
                deltatune implements.
            CheckpointError: the weights file is missing or corrupt, or its keys/shapes do not fit this model.
            UnsupportedArgumentError: a keyword argument deltatune does not implement.
        """
        revision = kwargs.pop("revision", None)
        device, autocast_adapter_dtype, ignore_mismatched = load_options(self._base, kwargs)
        self._check_name(adapter_name, exists=False)
        directory = adapter_dir(model_id, subfolder, revision)
        with io.folder_lock(directory, exclusive=False):  # the config and the weights of one save (see saving.py)
            given = config or AdapterConfig.from_pretrained(directory)
            spec = spec_for_config(given)
            config = given.replace(inference_mode=not is_trainable)
            config = with_task_heads(self._base, spec.complete(config, self._base), self.task_heads)
            self._check_same_method(spec)
            found = io.from_peft_keys(io.read_tensors(directory, device), spec.module_key_prefix)
        flags, keep_flags = {p: p.requires_grad for p in self._base.parameters()}, bool(self.peft_config)
        with no_init_weights():  # every tensor is overwritten from the file (check_state): skip random inits
            self._inject(adapter_name, config, spec, strict=False)
        try:
            with adapters.fixed_structure(self._base):  # no module moves in here: the wrappers are found once
                adapters.set_adapter_dtype(self._base, adapter_name, autocast_adapter_dtype)
                self.peft_config[adapter_name] = config
                expected = io.from_peft_keys(self.adapter_state_dict(adapter_name), spec.module_key_prefix)
                expected.update(self._saved_base_weights(found, expected))
                io.check_state(expected, found, str(directory / io.WEIGHTS_NAME), drop_mismatched=ignore_mismatched)
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            self._remove_from_modules(adapter_name)
            _set_requires_grad(flags)
            raise
        with adapters.fixed_structure(self._base):
            self._initialize_from_base(adapter_name)  # as at creation (peft does the same), then the saved tensors
            self._copy_state(adapter_name, found, expected)
            self.peft_config[adapter_name] = given.update_from(config)
            if is_trainable:  # trains from now on, active or not (peft's rule for loaded adapters)
                self._loaded_trainable.add(adapter_name)
            if not self._active:
                self._active = [adapter_name]
            self._apply_active()
            _set_requires_grad(flags if keep_flags else {})
        return LoadResult([], [])  # peft's load result; keys that do not fit were refused above

    def _initialize_from_base(self, adapter_name: str) -> None:
        for layer in self._layers():
            layer.initialize_from_base(adapter_name)

    def _saved_base_weights(self, found: dict[str, Tensor], adapter_keys: Container[str] = ()) -> dict[str, Tensor]:
        """Base weights that peft stores beside the adapter (`save_embedding_layers`: an adapted embedding's full
        table, `<path>.base_layer.weight`, or a plain embedding's `<path>.weight`, e.g. after resizing the
        vocabulary): loaded into the base like peft does. `adapter_keys` (the adapter's own) are not looked for."""
        layers = {f"{path}.base_layer.weight": w for path, w in self._wrappers() if isinstance(w, AdapterLayer)}
        out = {k: layers[k].get_base_layer().weight for k in found if k in layers}
        if any(k.endswith(".weight") and k not in layers and k not in adapter_keys for k in found):
            plain = self._embedding_params()  # a table saved for a layer no adapter wraps
            out.update({k: plain[k] for k in found if k in plain and k not in out})
        return out

    def load_adapter_tensors(
        self, adapter_name: str, tensors: dict[str, Tensor], ignore_mismatched_sizes: bool = False
    ) -> None:
        """Overwrite an existing adapter's tensors from a peft-keyed dict (e.g. a training checkpoint); checked
        first (`ignore_mismatched_sizes`: tensors of another shape are left as they are, with a warning)."""
        self._check_name(adapter_name, exists=True)
        prefix = self._module_prefix(self.peft_config[adapter_name])
        found = io.from_peft_keys(tensors, prefix)
        expected = io.from_peft_keys(self.adapter_state_dict(adapter_name), prefix)
        io.check_state(expected, found, "adapter tensors", drop_mismatched=ignore_mismatched_sizes)
        self._copy_state(adapter_name, found)

    @torch.no_grad()
    def _copy_state(self, adapter_name: str, found: dict[str, Tensor], own: dict[str, Tensor] | None = None) -> None:
        """Write `found` (checked against this adapter's keys) into the model: each wrapper takes its own tensors
        (`load_adapter_state`: one whose saved form differs from its training form rebuilds itself), the rest is
        copied in place."""
        found = dict(found)
        for path, wrapper in self._wrappers():
            names = {_in_model(path, k): k for k in wrapper.adapter_state(adapter_name)}
            mine = {names[key]: found.pop(key) for key in list(found) if key in names}
            if mine:
                wrapper.load_adapter_state(adapter_name, mine)
        if own is None:
            prefix = self._module_prefix(self.peft_config[adapter_name])
            own = {
                **io.from_peft_keys(self.adapter_state_dict(adapter_name), prefix),
                **self._saved_base_weights(found),
            }
        for key, tensor in found.items():
            own[key].copy_(tensor.to(own[key].dtype))


def _in_model(path: str, key: str) -> str:
    """A state key of the wrapper at `path` as a model-level key; top-level keys stay as they are."""
    return key if key.startswith(io.ROOT_MARK) else f"{path}.{key}"


def _set_requires_grad(flags: dict[nn.Parameter, bool]) -> None:
    """Give parameters back their requires_grad: `load_adapter` does on failure, and after loading into a model that
    holds adapters (peft's rule; a first load, from_pretrained, freezes the base as get_peft_model does)."""
    for param, requires_grad in flags.items():
        param.requires_grad_(requires_grad)


def load_options(base: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.device | None, bool, bool]:
    """peft's `load_adapter` keywords, checked: (the device to read the file into, `autocast_adapter_dtype`,
    `ignore_mismatched_sizes`). Any other keyword, or a value deltatune cannot honour, is refused by name."""
    options = dict(kwargs)
    torch_device = options.pop("torch_device", None)
    device_map = options.pop("device_map", None)
    defaults = {"autocast_adapter_dtype": True, "low_cpu_mem_usage": False, "ignore_mismatched_sizes": False}
    flags = {name: flag("load_adapter", name, options.pop(name, default)) for name, default in defaults.items()}
    refuse_unknown("load_adapter", options, {"ephemeral_gpu_offload": (False,), "key_mapping": (None, {})})
    if device_map is not None:
        check_device_map(base, device_map)
    device = None if torch_device is None else available_device(torch_device)
    return device, flags["autocast_adapter_dtype"], flags["ignore_mismatched_sizes"]


def available_device(torch_device: str | torch.device) -> torch.device:
    """`torch_device` as a device this machine has, else a ConfigError naming it."""
    try:
        device = torch.device(torch_device)
    except (RuntimeError, TypeError, ValueError) as exc:
        why = f'torch_device={torch_device!r} is not a device ({exc}); use e.g. "cpu" or "cuda:0".'
        raise ConfigError(why) from exc
    backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ConfigError(f'torch_device={torch_device!r}: this machine has no {device.type} device; use "cpu".')
    if device.type == "meta":
        raise UnsupportedArgumentError("torch_device='meta' would load no values; use the device the model is on.")
    return device


def check_device_map(base: nn.Module, device_map: Any) -> None:
    """peft uses `device_map` only to re-dispatch a model accelerate offloaded to cpu/disk; on any other model the
    adapters simply follow their layers. deltatune does not re-dispatch offloaded models, so it refuses those."""
    if not isinstance(device_map, (str, dict)):
        raise ConfigError(f'device_map must be a string (e.g. "auto") or a dict; got {device_map!r}.')
    placed = getattr(base, "hf_device_map", None) or {}
    offloaded = sorted(k for k, v in placed.items() if v in ("cpu", "disk")) if len(set(placed.values())) > 1 else []
    if offloaded:
        raise UnsupportedArgumentError(
            f"load_adapter(device_map={device_map!r}) on a model accelerate offloaded ({offloaded[:3]} on cpu/disk): "
            f"deltatune does not re-dispatch offloaded models; load the base model onto one device."
        )


def _embedding_layers(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embedding modules that hold a weight table (behind any adapter wrapper); none
    where the model does not say (a model without the getters, or whose getter raises, e.g. an image model)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        except NotImplementedError:
            layer = None
        layer = layer.get_base_layer() if isinstance(layer, AdapterLayer) else layer
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            layers.append(layer)
    return layers
