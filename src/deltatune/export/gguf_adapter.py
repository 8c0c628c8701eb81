"""`export_gguf_adapter`: a LoRA adapter as a llama.cpp adapter file (GGUF, `general.type = adapter`).

llama.cpp adds `scale · B·A` with scale = `adapter.lora.alpha` / rank per tensor, onto weights named as in the base GGUF
(`blk.N.attn_q.weight`, its LoRA tensors `blk.N.attn_q.weight.lora_a` (r, d_in) and `.lora_b` (d_out, r)). Written
with the `gguf` package; names come from its tensor-name map for the architecture (no table here). What deltatune's
config scales differently from alpha/r (rsLoRA, `rank_pattern` / `alpha_pattern`) is folded into B, so the file is
right under llama.cpp's rule. LLaMA-family GGUF files store q and k with their rows permuted for llama.cpp's rotary
layout (transformers un-permutes them on load), so B of q and k is permuted the same way.

Refused, with the reason: non-LoRA methods, DoRA (its magnitude rescaling is not B·A), `lora_bias`,
`modules_to_save` and trainable tokens (whole tensors llama.cpp adapters cannot carry), inits that rewrite the base
(PiSSA, OLoRA, LoftQ: the adapter is relative to a base llama.cpp does not have).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from deltatune import io
from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.export.gguf_file import write_gguf
from deltatune.methods.lora_layer import base_rewriting_init, lora_module_scale

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
_PERMUTED = {"llama", "mistral"}  # families whose GGUF q/k rows are permuted for llama.cpp's rotary layout


def llama_permute(rows: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k row permutation (the inverse of transformers' `_reverse_permute_weights`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_row_order(rows: torch.Tensor, module: str, family: str, config: dict) -> torch.Tensor:
    """`rows` (a weight, ΔW or LoRA's B) of the module named `module` in llama.cpp's row order: q and k of the families
    it permutes for its rotary layout (`config`: the model's config as a dict), others as they are."""
    if family not in _PERMUTED:
        return rows
    if module.endswith("q_proj"):
        return llama_permute(rows, config["num_attention_heads"])
    if module.endswith("k_proj"):
        return llama_permute(rows, config["num_attention_heads"], config.get("num_key_value_heads"))
    return rows


def require_gguf():
    """The `gguf` package, or an error saying how to get it (an optional extra)."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "GGUF export needs the gguf package: pip install 'deltatune[models]' (or pip install gguf)."
        ) from None
    return gguf


def _check_exportable(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    if config.peft_type != "LORA":
        from deltatune.registry import get_method

        fix = (
            "merge it into the model instead (`deltatune export gguf --merged`, or merge_and_unload)"
            if get_method(config.peft_type).mergeable
            else "it cannot be merged either (it is not a change of weights): serve it with deltatune or transformers"
        )
        raise ConfigError(f"a {config.peft_type} adapter cannot be a llama.cpp LoRA adapter; {fix}.")
    reasons = {
        "use_dora": "DoRA rescales the weight's columns, which is not B·A",
        "kasa_config": "KaSA's update is B·diag·A on a base it truncated, which a llama.cpp adapter on the original "
        "weights cannot express",
        "lora_bias": "lora_bias adds a bias llama.cpp adapters cannot carry",
        "use_bdlora": "BD-LoRA saves block-diagonal factors as their blocks, which llama.cpp reads as dense ones",
        "modules_to_save": "modules_to_save trains whole modules llama.cpp adapters cannot carry",
        "trainable_token_indices": "trainable tokens replace embedding rows llama.cpp adapters cannot carry",
    }
    for field, why in reasons.items():
        if getattr(config, field, None):
            raise ConfigError(f"{field} is set: {why}; merge the adapter into the model instead.")
    init = base_rewriting_init(config)
    if init:
        raise ConfigError(f"init_lora_weights={init}: the adapter is relative to a rewritten base; merge it instead.")
    if any(".lora_embedding_" in k for k in tensors):
        raise ConfigError("the adapter has LoRA on an embedding; llama.cpp adapters cover linear layers only.")


def _base_config(config: AdapterConfig, model: str | None) -> dict:
    """The base's config.json: `model`, else the adapter's base when it exists here, else the bundled model."""
    from deltatune.pretrained import resolve_model_path

    recorded = config.base_model_name_or_path
    source = model or (recorded if recorded and (Path(recorded) / "config.json").is_file() else "smollm2")
    return json.loads((resolve_model_path(source) / "config.json").read_text())


def export_gguf_adapter(
    adapter_dir: str | Path, out: str | Path, outtype: str = "f32", model: str | None = None
) -> Path:
    """Write the LoRA adapter in `adapter_dir` as a llama.cpp adapter GGUF at `out` (see the module doc). `model`:
    the base (a directory, a .gguf or "smollm2"; default: the adapter's base_model_name_or_path)."""
    gguf = require_gguf()

    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}.")
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = AdapterConfig.from_pretrained(adapter_dir)
    tensors = io.from_peft_keys(io.read_tensors(adapter_dir))
    _check_exportable(config, tensors)
    base = _base_config(config, model)
    family = base.get("model_type")
    if family not in _ARCHS:
        raise ConfigError(f"model_type {family!r}: the exporter knows {sorted(_ARCHS)} (llama.cpp's names for them).")
    arch = getattr(gguf.MODEL_ARCH, _ARCHS[family])
    names = gguf.get_tensor_name_map(arch, base["num_hidden_layers"])
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    ranks = {m: tensors[f"{m}.lora_A.weight"].shape[0] for m in modules}
    alpha = float(max(ranks.values()))  # llama.cpp's scale is alpha / rank per tensor: fold the rest into B
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module in modules:
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ConfigError(f"{module} has no llama.cpp tensor name for {family}; target other modules.")
        scale = lora_module_scale(config, module)
        a = tensors[f"{module}.lora_A.weight"].float()
        b = tensors[f"{module}.lora_B.weight"].float() * (scale * ranks[module] / alpha)
        b = gguf_row_order(b, module, family, base)
        for suffix, value in ((".lora_a", a), (".lora_b", b)):
            _add(writer, target + suffix, value, outtype)
    write_gguf(writer, out)
    return out


def _add(writer, name: str, tensor: torch.Tensor, outtype: str) -> None:
    import gguf

    data = tensor.contiguous().numpy().astype(np.float32)
    if outtype == "f32":
        writer.add_tensor(name, data)
    elif outtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            raise ConfigError(f"q8_0 needs rows of a multiple of 32 values; {name} has {data.shape[-1]}: use f16.")
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
