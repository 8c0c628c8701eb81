"""Writing adapters to disk: `PeftModel.save_pretrained`'s files, what a transformers Trainer checkpoint needs, and
the training state deltatune's own trainer checkpoints.

transformers' `Trainer` saves every checkpoint (and `save_model`) through the model's `save_pretrained` (the model is
a `PreTrainedModel` by type, `deltatune.facade`), so each holds the adapter files. To resume one (or load the best one
at the end), Trainer reads `model.safetensors` with `model.load_state_dict(..., strict=False)`, a path it takes for
any non-peft model: in folders Trainer resumes from (`checkpoint-<step>`) that file is written too, holding the
adapters' tensors only, under the model's own state-dict keys (adapter-sized, like the rest).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from deltatune import io
from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, UnsupportedArgumentError
from deltatune.facade import TRAINER_CHECKPOINT
from deltatune.registry import MethodHooks, get_method
from deltatune.state_dict import get_peft_model_state_dict, module_keys

if TYPE_CHECKING:
    from deltatune.adapter_model import AdapterModel

TRAINER_WEIGHTS_NAME = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME, the file Trainer resumes from


def adapter_tensors(model: AdapterModel, name: str, state_dict: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Adapter `name`'s tensors under peft's saved keys: live, or taken from `state_dict`, which is either the
    model's own `state_dict()` (what Trainer passes, peft's meaning) or already the adapter's peft-keyed tensors."""
    own = model.adapter_state_dict(name)
    if state_dict is None:
        return own
    if set(state_dict) == set(own):
        return state_dict
    return get_peft_model_state_dict(model, state_dict, name)


def auto_mapping(model: nn.Module) -> dict[str, str]:
    """What an adapter without a task_type records about its base class (peft's `auto_mapping` field)."""
    return {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}


def save_adapters(
    model: AdapterModel,
    directory: Path,
    names: list[str],
    state_dict: dict[str, Tensor] | None,
    initial_dir: str | Path | None = None,
    extra: dict[str, dict[str, Tensor]] | None = None,
) -> None:
    """Write each adapter's two files ("default" in `directory`, others in `directory/<name>`), atomically; `extra`:
    per adapter, base tensors saved beside it (embedding tables, `save_embedding_layers`)."""
    if state_dict is not None and len(names) != 1 and set(state_dict) == set(model.adapter_state_dict(names[0])):
        raise AdapterError(f"peft-keyed state_dict given for {len(names)} adapters; pass selected_adapters=[one].")
    if initial_dir is not None and len(names) != 1:
        raise AdapterError("path_initial_model_for_weight_conversion converts one adapter: pass selected_adapters.")
    for name in names:
        target = directory if name == "default" else directory / name
        config, tensors = model.peft_config[name], adapter_tensors(model, name, state_dict)
        if initial_dir is not None:
            config, tensors = relative_to_initial(config, tensors, Path(initial_dir))
        tensors = {**tensors, **(extra or {}).get(name, {})}
        metadata = {} if config.task_type else {"auto_mapping": auto_mapping(model.get_base_model())}
        saved_config = config.replace(base_model_name_or_path=model._base_path(config), inference_mode=True)
        payload = io.dump_tensors(tensors)
        target.mkdir(parents=True, exist_ok=True)
        # the folder's lock: two processes saving here at once write one after the other, and a deltatune reader
        # (shared lock) sees one whole adapter, never one writer's config beside the other's weights
        with io.folder_lock(target, exclusive=True):
            io.atomic_write_bytes(target / io.WEIGHTS_NAME, payload)
            saved_config.save(target, metadata)
            model.create_or_update_model_card(target, name)
    if TRAINER_CHECKPOINT.match(directory.name):
        write_trainer_weights(model, directory, names, state_dict)


def relative_to_initial(
    config: AdapterConfig, tensors: dict[str, Tensor], initial_dir: Path
) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """The adapter re-expressed on the original base, from the tensors saved in `initial_dir` right after a
    base-rewriting init (the method's `relative_to_initial`)."""
    convert = get_method(config.peft_type).relative_to_initial
    if convert is None:
        raise UnsupportedArgumentError(
            f"path_initial_model_for_weight_conversion: {config.peft_type} adapters have no base-rewriting init to "
            "convert from; remove the argument."
        )
    initial = io.read_tensors(initial_dir)
    io.check_state(io.from_peft_keys(tensors), io.from_peft_keys(initial), str(initial_dir / io.WEIGHTS_NAME))
    return convert(config, tensors, initial)


def write_trainer_weights(
    model: AdapterModel, directory: Path, names: list[str], state_dict: dict[str, Tensor] | None
) -> None:
    """`directory/model.safetensors`: the adapters' tensors under `model.state_dict()` keys (see module doc)."""
    tensors: dict[str, Tensor] = {}
    for name in names:
        keys = module_keys(model, model.adapter_state_dict(name))
        tensors.update({keys[k]: t for k, t in adapter_tensors(model, name, state_dict).items()})
    io.atomic_write_bytes(directory / TRAINER_WEIGHTS_NAME, io.dump_tensors(tensors))


def frozen_keys(model: AdapterModel) -> list[str]:
    """The model's state-dict keys that `save_pretrained` never writes (everything but the adapters' tensors)."""
    adapter = set()
    for name in model.peft_config:
        adapter |= set(module_keys(model, model.adapter_state_dict(name)).values())
    return [k for k in model.state_dict() if k not in adapter]


def training_state(model: AdapterModel, hooks: MethodHooks | None) -> dict[str, Tensor]:
    """Every trainable tensor at full size under its module path (`param.<name>`), and the method hooks'
    accumulated state (`method.<key>`): what a resumed run of deltatune's trainer needs besides the optimizer."""
    out = {f"param.{n}": p for n, p in model.get_base_model().named_parameters() if p.requires_grad}
    if hooks is not None:
        out.update({f"method.{k}": v for k, v in hooks.state_dict(model).items()})
    return out


@torch.no_grad()
def load_training_state(model: AdapterModel, hooks: MethodHooks | None, tensors: dict[str, Tensor]) -> None:
    """Restore `training_state` output; names and shapes are checked before anything changes."""
    params = {n: p for n, p in model.get_base_model().named_parameters() if p.requires_grad}
    found = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    io.check_state(params, found, "training checkpoint")
    for name, value in found.items():
        params[name].copy_(value.to(params[name].dtype))
    if hooks is not None:
        hooks.load_state_dict(model, {k[len("method.") :]: v for k, v in tensors.items() if k.startswith("method.")})
