"""bitsandbytes' serialized 4-bit layout, both ways (what transformers + bitsandbytes write for a 4-bit model, and
what many pre-quantized models on the Hub are).

Per 4-bit linear `<m>`: `<m>.weight` (the packed codes, uint8 of shape (n/2, 1): the same nibble order as
deltatune's), `<m>.weight.absmax` (fp32 per block, or with double quantization uint8 indices into the dynamic 8-bit
code), `<m>.weight.quant_map` (the 16 code values), `<m>.weight.nested_absmax` / `nested_quant_map` (the second
level), and `<m>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON object stored as uint8 bytes (quant_type,
blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset). `config.json` carries
`quantization_config` (quant_method "bitsandbytes", load_in_4bit, bnb_4bit_*).

Decoding is bitsandbytes' arithmetic (code[q] · absmax, absmax = code8[a] · nested_absmax + offset, float32), so a
loaded model's weights equal bitsandbytes' dequantization bit for bit; encoding is its CPU encoder's (4-bit codes,
8-bit absmax indices, scales, offset), so a weight quantized here is bitsandbytes' bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from deltatune.errors import CheckpointError, ConfigError
from deltatune.functional.nf4 import NESTED_BLOCK, codebook, dynamic_code_8bit
from deltatune.inject import replace_module
from deltatune.io import atomic_write_bytes, dump_tensors
from deltatune.quant.linear4bit import Linear4bit
from deltatune.quant.state import QuantState

STATE_KEY = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_STATE_BUFFERS = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")


def is_bnb_4bit_dir(path: str | Path) -> bool:
    """True for a model directory whose config.json says it holds bitsandbytes 4-bit weights."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))


def state_tensors(prefix: str, state: QuantState, dtype: str = "float32") -> dict[str, Tensor]:
    """bitsandbytes' tensors for one 4-bit weight saved under `prefix` (e.g. "model.layers.0.mlp.up_proj.weight")."""
    blob = {"quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": dtype, "shape": list(state.shape)}
    out = {prefix: state.packed.reshape(-1, 1), f"{prefix}.quant_map": codebook(state.quant_type).clone()}
    if state.double_quant:
        out[f"{prefix}.absmax"] = state.absmax_codes
        out[f"{prefix}.nested_absmax"] = state.absmax_scale
        out[f"{prefix}.nested_quant_map"] = dynamic_code_8bit().clone()
        blob |= {
            "nested_blocksize": NESTED_BLOCK,
            "nested_dtype": "float32",
            "nested_offset": state.absmax_offset.item(),
        }
    else:
        out[f"{prefix}.absmax"] = state.absmax
    payload = json.dumps(blob).encode()
    out[f"{prefix}.{STATE_KEY}{state.quant_type}"] = torch.tensor(list(payload), dtype=torch.uint8)
    return out


def state_from_tensors(prefix: str, tensors: dict[str, Tensor]) -> tuple[QuantState, str]:
    """(QuantState, dtype name) of the 4-bit weight bitsandbytes saved under `prefix`; a code table other than the
    standard NF4 / FP4 / dynamic ones is refused (deltatune decodes with its own tables)."""
    blob_key = next((k for k in tensors if k.startswith(f"{prefix}.{STATE_KEY}")), None)
    if blob_key is None:
        raise CheckpointError(f"{prefix}: no {STATE_KEY}<type> entry: not a bitsandbytes 4-bit weight.")
    blob = _quant_blob(prefix, tensors[blob_key])
    quant_type = blob["quant_type"]
    _check_sizes(prefix, blob, tensors)
    if quant_type not in ("nf4", "fp4") or not torch.equal(
        tensors[f"{prefix}.quant_map"].float(), codebook(quant_type)
    ):
        raise CheckpointError(f"{prefix}: quant_map is not the standard {quant_type} table; it cannot be decoded here.")
    state = QuantState(tensors[prefix].reshape(-1), torch.Size(blob["shape"]), quant_type, blob["blocksize"])
    if "nested_blocksize" in blob:
        if blob["nested_blocksize"] != NESTED_BLOCK or not torch.equal(
            tensors[f"{prefix}.nested_quant_map"].float(), dynamic_code_8bit()
        ):
            raise CheckpointError(f"{prefix}: nested quantization other than 8-bit dynamic blocks of 256.")
        state.absmax_codes = tensors[f"{prefix}.absmax"]
        state.absmax_scale = tensors[f"{prefix}.nested_absmax"].float()
        state.absmax_offset = torch.tensor(blob["nested_offset"], dtype=torch.float32)
    else:
        state.absmax = tensors[f"{prefix}.absmax"].float()
    return state, blob.get("dtype", "float32")


def _quant_blob(prefix: str, raw: Tensor) -> dict:
    """The JSON record bitsandbytes stores beside a 4-bit weight, with its fields checked."""
    try:
        blob = json.loads(bytes(raw.tolist()).decode())
        shape, blocksize = [int(d) for d in blob["shape"]], int(blob["blocksize"])
        blob["quant_type"]  # noqa: B018 (presence)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{prefix}: its quant state record is unreadable ({why}).") from None
    if not shape or min(shape) <= 0 or blocksize <= 0 or blocksize & (blocksize - 1):
        raise CheckpointError(f"{prefix}: quant state shape {shape} / blocksize {blocksize} are not a 4-bit layout.")
    return {**blob, "shape": shape, "blocksize": blocksize}


def _check_sizes(prefix: str, blob: dict, tensors: dict[str, Tensor]) -> None:
    """Refuse a record whose shape does not match the stored bytes (a lying size), before anything is decoded."""
    numel = math.prod(blob["shape"])
    needed = {prefix: (numel + 1) // 2, f"{prefix}.absmax": -(-numel // blob["blocksize"])}
    for key, count in needed.items():
        if key not in tensors:
            raise CheckpointError(f"{prefix}: {key} is missing; the file is not a whole bitsandbytes 4-bit weight.")
        if tensors[key].numel() != count:
            raise CheckpointError(
                f"{prefix}: {key} holds {tensors[key].numel()} values, but shape {blob['shape']} with blocksize "
                f"{blob['blocksize']} needs {count}; the file's sizes do not agree (damaged or hand-edited)."
            )


@torch.no_grad()
def load_bnb_4bit_causal_lm(path: str | Path, backend: str = "auto") -> nn.Module:
    """A causal LM from a bitsandbytes-serialized 4-bit directory: its 4-bit linears become deltatune `Linear4bit`s
    (pure PyTorch on any device; bitsandbytes' kernels on CUDA when installed and `backend` allows), holding the
    file's bytes; other weights as saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from deltatune.quant.loading import _parameters_on_meta, _set_param, _weight_files

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    compute = _DTYPE_NAMES.get(str(quant.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch."), "fp32")
    config.quantization_config = None
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(path)
    tensors: dict[str, Tensor] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as fh:
            tensors.update({key: fh.get_tensor(key) for key in fh.keys()})
    for prefix in sorted({k.split(f".{STATE_KEY}")[0] for k in tensors if f".{STATE_KEY}" in k}):
        module_name = prefix.removesuffix(".weight")
        linear = model.get_submodule(module_name)
        state, _ = state_from_tensors(prefix, tensors)
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(
                f"{prefix} has shape {tuple(state.shape)}, the model expects {tuple(linear.weight.shape)}."
            )
        bias = tensors.pop(f"{module_name}.bias", None)
        replace_module(
            model, module_name, Linear4bit(linear.in_features, linear.out_features, state, bias, compute, backend)
        )
        for key in [k for k in tensors if k == prefix or k.startswith(prefix + ".")]:
            del tensors[key]
    for key, tensor in tensors.items():
        _set_param(model, key, tensor.float() if tensor.is_floating_point() else tensor)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{path}: no weights for {missing[:3]}; incomplete checkpoint?")
    return model.requires_grad_(False).eval()


def save_bnb_4bit(model: nn.Module, directory: str | Path) -> None:
    """Write `model` (with deltatune `Linear4bit` layers) as transformers + bitsandbytes write a 4-bit model:
    model.safetensors in their layout and config.json with its `quantization_config`, so
    `AutoModelForCausalLM.from_pretrained(directory)` with bitsandbytes installed loads the same weights."""
    directory = Path(directory)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ConfigError("the model has no 4-bit linear layers (deltatune.quantize_model first).")
    kinds = {(m.quant_type, m.absmax_codes is not None, m.compute_dtype) for m in layers.values()}
    if len(kinds) != 1:
        raise ConfigError(f"bitsandbytes' config holds one 4-bit setting for the whole model; found {sorted(kinds)}.")
    ((quant_type, double_quant, compute),) = kinds
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if (owner in layers and leaf in _STATE_BUFFERS) or tensor.data_ptr() in seen:
            continue  # 4-bit buffers are written below; a tied weight once
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    for name, layer in layers.items():
        tensors.update(state_tensors(f"{name}.weight", layer.state()))
    atomic_write_bytes(directory / "model.safetensors", dump_tensors(tensors))
    config = model.config.to_dict()
    config["quantization_config"] = _bnb_config(model, quant_type, double_quant, compute)
    atomic_write_bytes(directory / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())


def _bnb_config(model: nn.Module, quant_type: str, double_quant: bool, compute: str) -> dict:
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}[compute]
    full_precision = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": [n.rsplit(".", 1)[-1] for n in full_precision] or None,
    }
