"""`AdapterConfig`: the base dataclass of every method's config, read and written as peft's `adapter_config.json`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from deltatune.config_types import check_field_types, check_regex
from deltatune.errors import (
    ConfigError,
    MissingConfigKeyError,
    PeftWarning,
    UnknownFieldWarning,
    UnsupportedArgumentError,
    UnsupportedFieldError,
)

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 2**20
METADATA_FIELDS = frozenset({"auto_mapping"})
"""Provenance fields peft writes that say nothing about the adapter's weights."""


def _library_version() -> str:
    try:
        return importlib.metadata.version("deltatune")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = f"{_library_version()}+deltatune"
"""What a new config records as `peft_version` (peft's provenance field): the writer is deltatune, at this version
(a PEP 440 local label, so tools that parse the field still can)."""


def _get_commit_hash(package: str) -> str | None:
    """The git commit a development install of `package` was built from, where its metadata records one."""
    try:
        url = importlib.metadata.distribution(package).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not url:
        return None
    try:
        return json.loads(url).get("vcs_info", {}).get("commit_id")
    except (json.JSONDecodeError, AttributeError):
        return None


def writer_version() -> str:
    """`__version__`, with the commit hash for a development version (ambiguous alone), "@UNKNOWN" when that cannot
    be found (a lookup failure warns and never breaks building a config)."""
    version = __version__
    if "dev" not in version:
        return version
    try:
        commit = _get_commit_hash("deltatune") or "UNKNOWN"
    except Exception:  # provenance must never stop a config from being built
        warnings.warn("could not determine the commit of this development version of deltatune", stacklevel=3)
        commit = "UNKNOWN"
    return f"{version}@{commit}"


def _is_unset(value: Any) -> bool:
    """True for the values peft writes for an option that is off (None, False, empty, "none")."""
    return value is None or value is False or value == "none" or (hasattr(value, "__len__") and len(value) == 0)


class MethodName(str):
    """A method's `peft_type`: a plain string that also answers `.value` and `.name`, as peft's `PeftType` member
    does (code written for peft reads `config.peft_type.value`)."""

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


class _ConfigType(type):
    """Takes peft's `peft_type` keyword (`LoraConfig(**json.load(f))` passes it): the class's own type is accepted,
    another one refused by name (peft overwrites it silently). A class's `peft_type` becomes a `MethodName`."""

    def __init__(cls, name: str, bases: tuple, namespace: dict) -> None:
        super().__init__(name, bases, namespace)
        own = namespace.get("peft_type")
        if isinstance(own, str) and not isinstance(own, MethodName):
            cls.peft_type = MethodName(own)

    @property
    def __signature__(cls) -> inspect.Signature:
        """The fields, as `inspect.signature` / `help()` show a dataclass (`__call__` below would hide them behind
        *args, **kwargs)."""
        init = inspect.signature(cls.__init__)
        return init.replace(parameters=list(init.parameters.values())[1:])  # without self

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        given = kwargs.pop("peft_type", None)
        value = getattr(given, "value", given)
        if given is not None and cls.peft_type and value != cls.peft_type:
            raise ConfigError(
                f"peft_type={value!r} given to {cls.__name__}, whose peft_type is {cls.peft_type!r}: drop the "
                "argument, or use the config class of that method."
            )
        return super().__call__(*args, **kwargs)


HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "revision")
"""Keywords `from_pretrained` passes to huggingface_hub when `model_id` is a Hub repo."""


@dataclass
class AdapterConfig(metaclass=_ConfigType):
    """Fields shared by every method; names and meanings are peft's.

    Subclasses set the class attribute `peft_type` and list peft fields they know but do not implement in
    `unsupported_fields`: loading a file that sets one of those to a non-default value raises
    `UnsupportedFieldError` instead of silently training something else.
    """

    peft_type: ClassVar[str] = ""
    unsupported_fields: ClassVar[tuple[str, ...]] = ()
    inert_fields: ClassVar[tuple[str, ...]] = ()
    """peft fields that only qualify an unsupported option (e.g. its group size); read and dropped quietly."""
    peft_ignores: ClassVar[tuple[str, ...]] = ()
    """Fields deltatune honours that peft's config class of this method lacks: peft drops them (with a warning)
    when it reads the file and adapts other modules than the adapter holds; `save` warns when one is set."""
    regex_excludes_layer_selection: ClassVar[bool] = False
    """peft's rule for this method: a str `target_modules` takes no `layers_to_transform` / `layers_pattern`."""

    target_modules: list[str] | str | None = None
    """Module names to adapt: a list of name suffixes, a regex matched against the full name, or "all-linear"."""
    exclude_modules: list[str] | str | None = None
    """Module names never adapted (same forms as `target_modules`)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these layer indices (of the model's layer list)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list (e.g. "layers", "h") used with `layers_to_transform`."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    task_type: str | None = None
    """peft's task type ("CAUSAL_LM", "SEQ_CLS", ...), recorded for other tools."""
    base_model_name_or_path: str | None = None
    """Where the base model lives; filled in from the model's config when saving."""
    revision: str | None = None
    inference_mode: bool = False
    """True when the adapter is loaded for inference only (peft writes true on save)."""
    peft_version: str | None = None
    """Which library version wrote the config (peft's provenance field): filled in when unset ("0.1.0+deltatune"),
    kept as read from a file."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.peft_version is None:
            self.peft_version = writer_version()
        for name in ("target_modules", "exclude_modules"):
            check_regex(self, name)
        self._check_task_type()
        if isinstance(self.target_modules, list):
            if not self.target_modules and self.needs_target_modules():
                raise ConfigError(
                    'target_modules is an empty list: name at least one module, e.g. ["q_proj", "v_proj"].'
                )
            bad = [t for t in self.target_modules if not isinstance(t, str) or not t]
            if bad:
                raise ConfigError(f"target_modules must hold non-empty strings; got {bad!r}.")
        if self.regex_excludes_layer_selection:
            self.refuse_layer_selection_with_regex()
        indices = self.layers_to_transform_list()  # an int stays as given (peft keeps it), meaning that one layer
        if indices is not None and any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in indices):
            raise ConfigError(
                f"layers_to_transform must be a layer index or a list of them (integers >= 0), got "
                f"{self.layers_to_transform!r}."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified (peft's rule): "
                "layers_pattern is only used with layers_to_transform; set both, or neither."
            )

    def layers_to_transform_list(self) -> list[int] | None:
        """`layers_to_transform` as a list (an int names one layer), or None: every layer."""
        value = self.layers_to_transform
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    def refuse_layer_selection_with_regex(self) -> None:
        """A str `target_modules` with `layers_to_transform` / `layers_pattern` refused (peft's rule for LoRA and
        AdaLoRA: peft refuses such a config when it reads it, so the adapter would not move to peft)."""
        if not isinstance(self.target_modules, str):
            return
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"`{name}` cannot be used when `target_modules` is a str. Put the layers in the regex (e.g. "
                    rf"r'.*\.layers\.(0|1)\..*(q_proj|v_proj)'), or list the module names instead of a str."
                )

    def _check_task_type(self) -> None:
        from deltatune.peft_types import TaskType

        if self.task_type is not None and self.task_type not in set(TaskType):
            raise ConfigError(
                f"Invalid task type: {self.task_type!r}. Must be one of the following task types: "
                f"{', '.join(TaskType)}. Fix the config's task_type (or leave it unset)."
            )

    def update_from(self, other: AdapterConfig) -> AdapterConfig:
        """Copy every field of `other` (a config of the same class) into this object, and return it: a model keeps the
        config object it was given (as peft does), holding the values the model completed (e.g. default targets)."""
        if type(other) is not type(self):
            raise ConfigError(f"cannot update a {type(self).__name__} from a {type(other).__name__}.")
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))
        return self

    def needs_target_modules(self) -> bool:
        """False when the config adapts something besides modules, so an empty `target_modules` list is meaningful
        (a method's config decides)."""
        return True

    # -- JSON ---------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with peft's keys, `peft_type` included."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        out["peft_type"] = str(self.peft_type)  # a plain str: yaml and other encoders refuse str subclasses
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a peft-style dict; fields peft knows but deltatune does not implement must be unset."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(f"peft_type {peft_type!r} given to {cls.__name__}, which reads {cls.peft_type!r}.")
        known = {f.name for f in fields(cls)}
        for name in cls.unsupported_fields:
            if name in data and not _is_unset(data[name]):
                raise UnsupportedFieldError(
                    f"adapter config sets {name}={data[name]!r}, which deltatune's {cls.__name__} does not support; "
                    f"remove the field (or set it to its default) to load this adapter."
                )
        quiet = known | set(cls.unsupported_fields) | set(cls.inert_fields) | METADATA_FIELDS
        unknown = sorted(k for k in data if k not in quiet)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. "  # peft's words
                "They are unknown to deltatune (a newer peft, or a typo) and were not applied; if they change the "
                "adapter's outputs, this adapter will not behave as saved.",
                UnknownFieldWarning,
                stacklevel=3,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a wrong type deep in a field
            raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, directory: str | Path, subfolder: str | None = None, **kwargs: Any) -> AdapterConfig:
        """Read `adapter_config.json` from `directory` (or `directory/subfolder`), a local folder or a Hub repo id
        (`revision`, `cache_dir`, `token`, ... go to huggingface_hub). On the base class the saved `peft_type` picks
        the method's config class (peft's `PeftConfig.from_pretrained`); on a method's class the file must be of that
        method."""
        from deltatune.registry import get_method

        unknown = sorted(set(kwargs) - set(HUB_KWARGS))
        if unknown:
            raise UnsupportedArgumentError(
                f"{cls.__name__}.from_pretrained got {unknown}; it takes subfolder and {', '.join(HUB_KWARGS)}."
            )
        try:
            data = read_config_dict(config_dir(directory, subfolder, **kwargs))
        except MissingConfigKeyError as exc:  # peft's words first, for code that matches them
            raise MissingConfigKeyError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"{exc}"
            ) from None
        target = get_method(data["peft_type"]).config_cls if cls is AdapterConfig else cls
        return target.from_dict(data)

    @classmethod
    def from_json_file(cls, path_json_file: str | Path) -> dict[str, Any]:
        """The JSON object in `path_json_file` (peft's helper); `runtime_config`, which peft never means to be
        saved, is dropped."""
        path = Path(path_json_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path} as JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}.")
        data.pop("runtime_config", None)
        return data

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write `adapter_config.json` atomically; `metadata` adds fields peft writes beside the config's own
        (e.g. `auto_mapping`)."""
        from deltatune.io import atomic_write_bytes

        self._warn_fields_peft_ignores()
        payload = json.dumps({**self.to_dict(), **(metadata or {})}, indent=2, sort_keys=True).encode()
        atomic_write_bytes(Path(directory) / CONFIG_NAME, payload)

    def _warn_fields_peft_ignores(self) -> None:
        given = {name: getattr(self, name) for name in self.peft_ignores if getattr(self, name) is not None}
        if given:
            settings = ", ".join(f"{k}={v!r}" for k, v in given.items())
            warnings.warn(
                f"{type(self).__name__}({settings}): peft's {type(self).__name__} has no such "
                f"{'field' if len(given) == 1 else 'fields'}; peft drops {'it' if len(given) == 1 else 'them'} when "
                f"it loads this adapter and adapts other modules than the file holds (deltatune loads it as saved). "
                f"To keep the adapter loadable in peft, choose the modules with target_modules alone (a list of names "
                f"or a regex that names the layers).",
                PeftWarning,
                stacklevel=3,
            )

    def save_pretrained(self, save_directory: str | Path, auto_mapping_dict: dict[str, Any] | None = None) -> None:
        """peft's name for `save`: `save_directory/adapter_config.json` (the folder is created);
        `auto_mapping_dict` is written as its `auto_mapping` field."""
        if Path(save_directory).is_file():
            raise ConfigError(f"save_directory {save_directory} is a file; give a folder.")
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.save(save_directory, {"auto_mapping": auto_mapping_dict} if auto_mapping_dict else None)

    def for_training(self, context: TrainingContext) -> AdapterConfig:
        """This config for a training run: a method whose settings depend on the run (its length, or statistics
        of the model on the run's data) fills them in here. The default needs nothing."""
        return self

    def replace(self, **changes: Any) -> AdapterConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class TrainingContext:
    """What a trainer tells a config about the run it is about to start (see `AdapterConfig.for_training`)."""

    total_steps: int
    """Optimizer steps the run will take."""
    model: Any = None
    """The base model, before any adapter is added."""
    calibration_batches: Callable[[], list[dict[str, Any]]] | None = None
    """A few of the run's first batches, built on demand (on the model's device)."""
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None
    """(model, batch) -> the run's mean loss on that batch."""


def config_dir(model_id: str | Path, subfolder: str | None = None, **hub_kwargs: Any) -> Path:
    """The local folder holding `adapter_config.json`: `model_id[/subfolder]` when it exists, else the Hub cache's
    snapshot of repo `model_id` (`hub_kwargs`: revision, cache_dir, token, ... as huggingface_hub takes them)."""
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.is_dir():
        if hub_kwargs.get("revision") not in (None, "main"):
            raise UnsupportedArgumentError(f"revision={hub_kwargs['revision']!r} given for the local folder {local}.")
        return local
    if Path(model_id).is_absolute() or str(model_id).count("/") != 1:
        raise ConfigError(f"{local} is not a folder, and {str(model_id)!r} is not a Hub repo id (user/name).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(model_id), CONFIG_NAME, subfolder=subfolder, **hub_kwargs)).parent
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConfigError(
            f"adapter config {model_id!r} is neither a local folder nor in the Hub (cache): {type(exc).__name__}: {exc}"
        ) from None


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):  # a method's sub-config (e.g. VeloraConfig)
        return asdict(value)
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def read_config_dict(directory: str | Path) -> dict[str, Any]:
    """Read and syntax-check `adapter_config.json`; errors name the file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_NAME} in {directory}: is this an adapter directory saved by save_pretrained?")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:  # a config is a few KiB: a huge file is not one, and reading it could exhaust memory
        raise ConfigError(f"{path} is {size} bytes, more than any adapter config ({MAX_CONFIG_BYTES}); not a config.")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); fix or re-save it.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or re-save it.") from exc
    except RecursionError:
        raise ConfigError(f"{path} nests its JSON too deeply to be an adapter config; fix or re-save it.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    if "peft_type" not in data:
        raise MissingConfigKeyError(
            f'{path} has no "peft_type" field; add the method\'s type (see deltatune.list_methods()).'
        )
    return data
