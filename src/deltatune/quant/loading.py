"""Load a HF causal LM straight into 4 bits, tensor by tensor, so peak memory stays near the 4-bit size.

The model skeleton is built with its parameters on the meta device (buffers stay real: rotary tables are computed
at construction); each weight is then read from the safetensors files on its own, and a linear weight is quantized
before the next one is read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from deltatune.errors import CheckpointError
from deltatune.inject import replace_module
from deltatune.quant.linear4bit import Linear4bit, linears_to_quantize
from deltatune.quant.state import QuantConfig


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (no memory) while buffers are allocated normally."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights; deltatune does not load pickled checkpoints.")
    return files


@torch.no_grad()
def load_quantized_causal_lm(
    path: str | Path, config: QuantConfig | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A causal LM from a HF directory with its linear layers in 4 bits (others in `dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, path = config or QuantConfig(), Path(path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.config._name_or_path = str(path)
    targets = set(linears_to_quantize(model, config))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                module_name, _, pname = key.rpartition(".")
                if module_name in targets:
                    pending.setdefault(module_name, {})[pname] = fh.get_tensor(key)
                    _maybe_quantize(model, module_name, pending, config)
                else:
                    _set_param(model, key, fh.get_tensor(key).to(dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or pending:
        raise CheckpointError(f"{path}: no weights for {(missing or sorted(pending))[:3]}; incomplete checkpoint?")
    return model.requires_grad_(False).eval()


def _maybe_quantize(model: nn.Module, name: str, pending: dict, config: QuantConfig) -> None:
    linear = model.get_submodule(name)
    have = pending[name]
    if "weight" not in have or (linear.bias is not None and "bias" not in have):
        return
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    dense.weight = nn.Parameter(have["weight"], requires_grad=False)
    if linear.bias is not None:
        dense.bias = nn.Parameter(have["bias"], requires_grad=False)
    replace_module(model, name, Linear4bit.from_linear(dense, config))
    del pending[name]


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, pname = key.rpartition(".")
    module = model.get_submodule(module_name)
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
    elif pname in module._buffers:
        module._buffers[pname] = tensor
    else:
        raise CheckpointError(f"weight {key!r} has no place in {type(model).__name__}.")
