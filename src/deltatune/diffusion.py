"""LoRA files of the diffusion world, both ways: diffusers' layout and kohya / AUTOMATIC1111's.

- **diffusers** (`pipe.save_lora_weights`, `pipe.load_lora_weights`, `model.load_lora_adapter`): one file
  `pytorch_lora_weights.safetensors` whose keys are the component's module paths behind its name (`unet.`,
  `transformer.`, `text_encoder.`) with peft's `lora_A` / `lora_B`, and the LoRA config as JSON in the safetensors
  header (`lora_adapter_metadata`, its fields behind the same prefix in a pipeline's file). A file saved by a model
  itself (`save_lora_adapter`) has neither prefix.
- **kohya / A1111** (sd-scripts, the files shared on model sites): `lora_unet_<module path with "_" for ".">` with
  `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` per module: the scale is alpha / rank, per module.

`load_lora_file` reads either into a deltatune adapter on the model (a UNet, a DiT / SD3-style transformer, any
module whose paths the file names); `save_diffusers_lora` writes an adapter in diffusers' pipeline layout. Several
files on one model mix with per-adapter weights through `PeftModel.set_adapter(names, weights=[...])` (diffusers'
`set_adapters(names, adapter_weights)`), or fold into one adapter with `add_weighted_adapter`. Weights are read
through safetensors only.
"""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.errors import CheckpointError, ConfigError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name for LoRA weights (`pipe.load_lora_weights(directory)` looks for it)."""
METADATA_KEY = "lora_adapter_metadata"
"""The safetensors header entry where diffusers keeps the LoRA config (JSON)."""
_MODEL_KEYS = "base_model.model."
"""peft's (and deltatune's) key prefix of a LoRA tensor in `adapter_model.safetensors`."""
_KOHYA_PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "transformer": "lora_transformer_",
}
"""kohya's key prefix per diffusers component."""


def save_diffusers_lora(model: Any, directory: str | Path, adapter_name: str = "default", prefix: str = "unet") -> Path:
    """Write LoRA adapter `adapter_name` of `model` (a deltatune PeftModel around a diffusers model) in diffusers'
    pipeline layout: `directory/pytorch_lora_weights.safetensors`, keys `<prefix>.<module>.lora_A/B.weight`, the
    config in the header. `pipe.load_lora_weights(directory)` (prefix "unet" for Stable Diffusion's UNet,
    "transformer" for DiT / SD3 / Flux) or `model.load_lora_adapter(file, prefix=prefix)` loads it."""
    config = model.peft_config.get(adapter_name)
    if config is None:
        raise ConfigError(f"no adapter {adapter_name!r} (adapters: {sorted(model.peft_config)}).")
    if config.peft_type != "LORA":
        raise ConfigError(f"diffusers' LoRA files hold LoRA adapters; {adapter_name!r} is {config.peft_type}.")
    if config.modules_to_save:
        raise ConfigError(
            f"adapter {adapter_name!r} trains whole modules ({config.modules_to_save}); diffusers' LoRA files have no "
            "place for them: save it with save_pretrained instead."
        )
    tensors = {}
    for key, tensor in model.adapter_state_dict(adapter_name).items():
        if not key.startswith(_MODEL_KEYS):
            raise ConfigError(f"adapter tensor {key} has no module path: diffusers' layout cannot hold it.")
        tensors[f"{prefix}.{key[len(_MODEL_KEYS) :]}"] = tensor.detach().contiguous()
    fields = {f"{prefix}.{k}": list(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHT_NAME
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(fields, sort_keys=True)})
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(tensors, the LoRA config from the header or None) of a safetensors LoRA file, or of the diffusers file in a
    directory."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: only .safetensors LoRA files are read (pickled .bin / .pt / .ckpt files are not).")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist.")
    try:
        with safe_open(str(path), "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    return tensors, metadata


def load_lora_file(model: nn.Module, path: str | Path, adapter_name: str = "default", prefix: str = "unet") -> Any:
    """Read a diffusers or kohya / A1111 LoRA file into adapter `adapter_name` of `model` (a PeftModel gets one
    more adapter; a plain model is wrapped) and return the PeftModel. `prefix` names the component the file's keys
    belong to ("unet", "transformer", "text_encoder"); keys of other components are left out with a warning that
    names them."""
    from deltatune import LoraConfig
    from deltatune.model import PeftModel

    tensors, metadata = read_lora_file(path)
    if any(key.startswith(tuple(_KOHYA_PREFIXES.values())) for key in tensors):
        body, fields = _from_kohya(tensors, prefix, model)
    elif any(".lora_A." in key for key in tensors):
        body, fields = _from_diffusers(tensors, metadata, prefix)
    else:
        raise ConfigError(
            f"{path}: neither a diffusers LoRA file (keys ...lora_A.weight / lora_B.weight) nor a kohya one (keys "
            f"lora_unet_... .lora_down.weight / .lora_up.weight); first keys: {sorted(tensors)[:3]}."
        )
    config = LoraConfig.from_dict({**fields, "peft_type": "LORA"})
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        from deltatune.model import get_peft_model

        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    peft_model.load_adapter_tensors(adapter_name, {_MODEL_KEYS + k: v for k, v in body.items()})
    return peft_model


def _from_diffusers(
    tensors: dict[str, Tensor], metadata: dict[str, Any] | None, prefix: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors under module paths, LoRA config fields) of a diffusers file: the `prefix` component's keys (all of
    them in a model-level file, which has no prefixes)."""
    mark = f"{prefix}."
    prefixed = any(key.startswith(mark) for key in tensors)
    if prefixed:
        others = sorted({key.split(".", 1)[0] for key in tensors if not key.startswith(mark)})
        if others:
            warnings.warn(f"the LoRA file also holds {others}; only {prefix!r} is loaded here.", stacklevel=3)
        tensors = {key[len(mark) :]: t for key, t in tensors.items() if key.startswith(mark)}
    if metadata is not None and prefixed:
        metadata = {k[len(mark) :]: v for k, v in metadata.items() if k.startswith(mark)} or None
    if metadata is not None:
        return tensors, metadata
    # no config in the header: the ranks from the shapes, alpha = rank (scale 1, diffusers' reading of such files)
    ranks = {key.rsplit(".lora_A.", 1)[0]: t.shape[0] for key, t in tensors.items() if ".lora_A." in key}
    return tensors, _lora_fields(ranks, dict(ranks))


def _from_kohya(tensors: dict[str, Tensor], prefix: str, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors under the model's module paths, LoRA config fields) of a kohya file: `lora_down` is A, `lora_up`
    is B, each module's scale alpha / rank (its `.alpha`, the rank when absent)."""
    mark = _KOHYA_PREFIXES.get(prefix)
    if mark is None:
        raise ConfigError(f"prefix {prefix!r}: kohya files name the components {sorted(_KOHYA_PREFIXES)}.")
    unsupported = sorted({key.rsplit(".", 1)[-1] for key in tensors if "dora_scale" in key or "hada_" in key})
    if unsupported or any("lokr_" in key for key in tensors):
        raise ConfigError(
            "this kohya file holds LyCORIS weights (DoRA scales, LoHa or LoKr factors), not plain LoRA; deltatune "
            "reads the lora_down / lora_up / alpha kind."
        )
    others = sorted({key.split(".", 1)[0].split("_")[1] for key in tensors if not key.startswith(mark)})
    if others:
        warnings.warn(f"the LoRA file also holds kohya components {others}; only {prefix!r} is loaded.", stacklevel=3)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    paths = {name.replace(".", "_"): name for name, _ in inner.named_modules() if name}
    body: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in tensors.items():
        if not key.startswith(mark):
            continue
        stem, _, kind = key[len(mark) :].partition(".")
        module = paths.get(stem)
        if module is None:
            unknown.append(stem)
            continue
        if kind == "lora_down.weight":
            body[f"{module}.lora_A.weight"] = tensor
            ranks[module] = tensor.shape[0]
        elif kind == "lora_up.weight":
            body[f"{module}.lora_B.weight"] = tensor
        elif kind == "alpha":
            alphas[module] = float(tensor)
        else:
            raise ConfigError(f"kohya key {key}: unknown part {kind!r} (expected lora_down / lora_up / alpha).")
    if unknown:
        raise ConfigError(
            f"{len(set(unknown))} kohya module names match no module of {type(inner).__name__} (first: "
            f"{sorted(set(unknown))[:3]}); files for the original Stable Diffusion layout (SDXL's input_blocks_...) "
            "need diffusers' conversion first: load them with pipe.load_lora_weights and save them with "
            "pipe.save_lora_weights, then read that file."
        )
    return body, _lora_fields(ranks, {m: alphas.get(m, float(r)) for m, r in ranks.items()})


def _lora_fields(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """LoRA config fields for per-module ranks and alphas: the most common of each as r / lora_alpha, the others in
    rank_pattern / alpha_pattern (full module paths), the modules as target_modules."""
    if not ranks:
        raise ConfigError("the LoRA file holds no lora_A / lora_down tensors.")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
    }


def train_noise_prediction(
    model: nn.Module,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    steps: int = 400,
    lr: float = 1e-4,
    batch_size: int = 1,
    seed: int = 0,
    num_train_timesteps: int = 1000,
) -> list[float]:
    """Train the trainable tensors of `model` (a PeftModel around a UNet2DConditionModel-like denoiser) on a few
    images, DreamBooth-style: each step draws images (their VAE latents, `latents` (N, C, H, W)) and their caption's
    text-encoder states (`encoder_hidden_states`, (N, T, D)), a timestep per image and Gaussian noise, noises the
    latents with DDPM's schedule (diffusers' `DDPMScheduler`) and regresses the noise (mean squared error). Returns the
    loss of every step. The model is left in eval mode."""
    import torch
    from diffusers import DDPMScheduler

    if latents.shape[0] != encoder_hidden_states.shape[0]:
        raise ConfigError(
            f"{latents.shape[0]} latents but {encoder_hidden_states.shape[0]} caption states: give one per image."
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable tensors: add an adapter (get_peft_model) first.")
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = latents.device
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        clean, states = latents[rows], encoder_hidden_states[rows]
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator).to(device)
        predicted = model(scheduler.add_noise(clean, noise, timesteps), timesteps, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(predicted.float(), noise.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
