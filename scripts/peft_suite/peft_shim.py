"""An import shim: `import peft` and `from peft.x.y import Name` resolve to deltatune's modules, nothing else.

Each peft module path maps to the deltatune modules that hold its public names (`MODULE_MAP`); a name is looked up
in them in order, under the same name or, where deltatune calls the same thing differently, the one in
`NAME_ALIASES`. A name found nowhere becomes a `Missing` stand-in: importing it works (so one absent name does not
hide a whole test file; calling it gives a stand-in value), using it in any other way raises `ShimMissing`
naming the peft path, which the report counts as
"missing import path" (or "method we do not have" for a peft method's config). The only other things the shim
defines are `HARNESS`: peft's environment probes (`is_*_available`), which say what is installed, not what a library
does. Test-only: never imported by deltatune.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

MODULE_MAP: dict[str, tuple[str, ...]] = {
    "peft": ("deltatune", "deltatune.errors"),
    "peft.config": ("deltatune.config", "deltatune"),
    "peft.mapping": ("deltatune.registry", "deltatune"),
    "peft.mapping_func": ("deltatune.model", "deltatune"),
    "peft.peft_model": ("deltatune.model", "deltatune.tasks", "deltatune"),
    "peft.utils": ("deltatune.utils", "deltatune.peft_types", "deltatune.layers", "deltatune.state_dict"),
    "peft.utils.other": ("deltatune.utils", "deltatune.layers"),
    "peft.utils.save_and_load": ("deltatune.state_dict", "deltatune"),
    "peft.utils.peft_types": ("deltatune.peft_types",),
    "peft.tuners": ("deltatune.methods",),
    "peft.tuners.tuners_utils": ("deltatune.layers", "deltatune.facade"),
    "peft.tuners._buffer_dict": (),
    "peft.import_utils": (),
}
for _method, _modules in {
    "lora": ("deltatune.methods.lora", "deltatune.methods.lora_layer", "deltatune.methods.dora"),
    "adalora": ("deltatune.methods.adalora",),
    "ia3": ("deltatune.methods.ia3",),
    "vera": ("deltatune.methods.vera",),
    "gralora": ("deltatune.methods.gralora",),
    "ln_tuning": ("deltatune.methods.ln_tuning",),
    "prompt_tuning": ("deltatune.methods.prompt_tuning",),
    "prefix_tuning": ("deltatune.methods.prefix_tuning",),
    "p_tuning": ("deltatune.methods.prompt_tuning", "deltatune.methods.prompt_learning"),
    "adaption_prompt": ("deltatune.methods.adaption_prompt",),
}.items():
    for _sub in ("", ".config", ".model", ".layer"):
        MODULE_MAP[f"peft.tuners.{_method}{_sub}"] = _modules

# peft name -> deltatune name, where deltatune's class of the same role has another name
NAME_ALIASES: dict[str, str] = {
    "BaseTunerLayer": "AdapterLayer",
    "LoraLayer": "_LoraLayer",
    "ModulesToSaveWrapper": "TrainableCopy",
    "AuxiliaryTrainingWrapper": "TrainableCopy",
}


def _transformers_ge_v5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


HARNESS: dict[str, Any] = {"is_transformers_ge_v5": _transformers_ge_v5}
for _backend in ("aqlm", "eetq", "gptqmodel", "hqq", "optimum", "torchao", "auto_awq", "inc", "xpu", "bnb"):
    HARNESS[f"is_{_backend}_available"] = lambda: False
HARNESS["is_bnb_4bit_available"] = lambda: False


class ShimMissing(Exception):
    """A peft name with no deltatune counterpart was used."""


def _refuse(path: str) -> ShimMissing:
    return ShimMissing(f"peft name without a deltatune counterpart: {path}")


class _MissingValue:
    """What calling a `Missing` name returns (so a module-level `KasaConfig()` in a test file still imports): any
    use of it raises `ShimMissing`."""

    def __init__(self, path: str):
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _refuse(f"{self._path}().{name}")

    def __repr__(self) -> str:
        return f"<missing {self._path}()>"

    def _use(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse(f"{self._path}()")

    __call__ = __bool__ = __iter__ = __len__ = __getitem__ = __eq__ = __hash__ = __str__ = __setattr__ = _use


class _MissingMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return _MissingValue(cls.peft_path)

    def _use(cls, *args: Any, **kwargs: Any) -> Any:
        raise _refuse(cls.peft_path)

    def __instancecheck__(cls, instance: Any) -> bool:
        return False  # nothing deltatune makes is an instance of a peft class it has no counterpart of

    def __subclasscheck__(cls, subclass: Any) -> bool:
        return False

    __getitem__ = __iter__ = _use

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):  # introspection (pytest, inspect): a plain class without the attribute
            raise AttributeError(name)
        raise _refuse(f"{cls.peft_path}.{name}")


def _missing(path: str) -> type:
    return _MissingMeta(path.rpartition(".")[2], (), {"peft_path": path})


class _ShimModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__version__":  # peft's tests patch peft.config.__version__
            raise AttributeError(name)
        path = f"{self.__name__}.{name}"
        if path in MODULE_MAP:
            return importlib.import_module(path)
        if name in HARNESS and self.__name__ == "peft.import_utils":
            return HARNESS[name]
        for module_name in MODULE_MAP.get(self.__name__, ()):
            module = importlib.import_module(module_name)
            for candidate in (name, NAME_ALIASES.get(name)):
                if candidate and hasattr(module, candidate):
                    value = getattr(module, candidate)
                    setattr(self, name, value)
                    return value
        value = _missing(path)
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # a test that patches a module global (monkeypatch.setattr(peft.config, "_get_commit_hash", ...)) patches it
        # where deltatune's code reads it: the first module the peft module maps to
        super().__setattr__(name, value)
        targets = MODULE_MAP.get(self.__name__, ())
        if targets and not name.startswith("__path"):
            module = importlib.import_module(targets[0])
            if hasattr(module, name) and getattr(module, name) is not value:
                setattr(module, name, value)


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" and not fullname.startswith("peft."):
            return None
        # an unmapped peft module imports as one whose every name is `Missing`: used, it counts as a missing path
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _ShimModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Route `peft` imports to deltatune (call before anything imports peft)."""
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _ShimFinder())
