"""Typed exceptions. Each message names the problem and the fix."""

from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltatuneError, ValueError):
    """An adapter or run configuration has an invalid value (the message names the field and the fix)."""


class UnsupportedFieldError(ConfigError):
    """A config sets a field that this version of deltatune does not implement (e.g. a peft-only option)."""


class UnsupportedArgumentError(ConfigError, TypeError):
    """A keyword argument (usually one of peft's) that deltatune does not implement; refused, never ignored."""


class UnknownFieldWarning(UserWarning):
    """An adapter config holds a field deltatune does not know (e.g. from a newer peft); it was not applied."""


class PeftWarning(UserWarning):
    """A setting that works but limits what the adapter can do later (peft's warning class, same name)."""


class UnknownMethodError(ConfigError):
    """A `peft_type` that no registered method provides."""


class TargetNotFoundError(ConfigError):
    """A `target_modules` entry matched no module; `suggestions` holds the closest module names."""

    def __init__(self, message: str, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.suggestions = suggestions or []


class MissingConfigKeyError(ConfigError, TypeError):
    """An adapter config file lacks a key every config needs (`peft_type`). A TypeError too, as peft raises."""


class UnsupportedModuleError(ConfigError):
    """A target module's type has no layer in the method's dispatch table."""


class AdapterError(DeltatuneError, KeyError, ValueError):
    """An adapter name that does not exist, already exists, or cannot be used for the asked operation. A KeyError (a
    name lookup) and a ValueError (what peft raises, and what peft users' code catches)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class MixedBatchError(AdapterError, TypeError):
    """`adapter_names=` (one adapter per row) given to a layer that cannot split a batch's rows. An AdapterError, and
    a TypeError as peft raises for such layers."""


class CheckpointError(DeltatuneError, RuntimeError):
    """A saved adapter is unreadable or does not fit the model (missing/unexpected keys, wrong shapes). A RuntimeError
    too, as torch's and peft's loading raise for a size mismatch."""


class MergeError(DeltatuneError, RuntimeError, ValueError):
    """A merge that cannot be done (non-finite results, a bias with nowhere to go, a layer that cannot hold the
    change); nothing was changed. A RuntimeError and a ValueError: what peft raises for these."""


class TrainingDiverged(DeltatuneError):
    """The loss became NaN/inf; training stopped before applying that update (the last checkpoint is intact)."""


class WriteError(DeltatuneError, OSError):
    """Writing a file failed (a full disk, a quota, a read-only folder); the files that were there before are intact
    and nothing partial is left under the final name. An OSError (with the original errno) as well."""
