"""Which LoRA servers can load an adapter as saved, and a rewrite for vLLM where one exists.

The rules, each with the reason the server has it:
    vLLM       reads `r`, `lora_alpha`, `use_rslora` and the tensors; refuses DoRA and `modules_to_save`; applies ONE
               scale (alpha / r, or alpha / sqrt(r)) to every module, so `rank_pattern` / `alpha_pattern` would be
               served at the wrong scale; `max_lora_rank` must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512
               and at least the adapter's largest rank; LoRA on linear layers only (no bias, no trainable tokens)
    llama.cpp  plain LoRA on linear layers, through `deltatune export gguf` (which folds scales itself)
    SGLang     serves peft-format LoRA as vLLM does (one scale, no DoRA, no modules_to_save)
`export_for_vllm` rewrites what can be rewritten: every module's own scale folded into B and the config set to
lora_alpha = r (scale 1), patterns and rsLoRA dropped; DoRA, modules_to_save, lora_bias, trainable tokens and
base-rewriting inits (PiSSA, OLoRA, LoftQ) cannot be rewritten and are reported instead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from deltatune import io
from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.methods.lora_layer import base_rewriting_init, lora_module_scale

VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SERVERS = ("vllm", "llama.cpp", "sglang")


@dataclass
class Check:
    rule: str
    ok: bool
    why: str = ""


def _common(config: AdapterConfig, tensors: dict) -> list[Check]:
    lora = config.peft_type == "LORA"
    init = base_rewriting_init(config) if lora else None
    instead = "merge it instead" if _mergeable(config) else "it cannot be merged: serve it with deltatune or peft"
    return [
        Check("LoRA", lora, "" if lora else f"a {config.peft_type} adapter: servers load LoRA only; {instead}"),
        Check("no DoRA", not getattr(config, "use_dora", False), "DoRA's magnitude rescaling is not served"),
        Check("no KaSA", not getattr(config, "kasa_config", None), "KaSA's truncated base and B·diag·A are not served"),
        Check(
            "no BD-LoRA", not getattr(config, "use_bdlora", None), "block-diagonal factors are saved as their blocks"
        ),
        Check("no lora_bias", not getattr(config, "lora_bias", False), "a LoRA bias term is not served"),
        Check(
            "no trainable tokens",
            not getattr(config, "trainable_token_indices", None),
            "new embedding rows (added tokens) are not served",
        ),  # fmt: skip
        Check(
            "linear layers only",
            not any(".lora_embedding_" in k for k in tensors),
            "LoRA on an embedding is not served",
        ),  # fmt: skip
        Check(
            "base not rewritten",
            init is None,
            f"init_lora_weights={init} changed the base: save with path_initial_model_for_weight_conversion",
        ),  # fmt: skip
    ]


def serving_report(adapter_dir: str | Path, server: str) -> list[Check]:
    """The server's rules (see the module doc) checked on the saved adapter."""
    if server not in SERVERS:
        raise ConfigError(f"server {server!r} is not one of {', '.join(SERVERS)}.")
    config = AdapterConfig.from_pretrained(adapter_dir)
    tensors = io.read_tensors(adapter_dir)
    checks = _common(config, tensors)
    if server == "llama.cpp":
        checks.append(Check("modules_to_save", not config.modules_to_save, "whole modules cannot be carried"))
        return checks
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")]
    largest = max(ranks, default=0)
    fitting = next((m for m in VLLM_MAX_RANKS if m >= largest), None)
    patterned = bool(getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None))
    checks += [
        Check("no modules_to_save", not config.modules_to_save, "vLLM only supports modules_to_save being None"),
        Check("one scale for all modules", not patterned,
              "rank_pattern / alpha_pattern: the server applies lora_alpha / r everywhere (deltatune export peft "
              "--for vllm folds them)"),  # fmt: skip
        Check(f"rank {largest} fits max_lora_rank", fitting is not None,
              f"start the server with --max-lora-rank {fitting}" if fitting else "above 512, the largest allowed"),
    ]  # fmt: skip
    return checks


def export_for_vllm(adapter_dir: str | Path, out: str | Path) -> Path:
    """A copy of the adapter that vLLM serves exactly (see the module doc)."""
    import torch
    from safetensors.torch import save_file

    failed = [c for c in serving_report(adapter_dir, "vllm") if not c.ok and c.rule != "one scale for all modules"]
    if failed:
        raise ConfigError("cannot be rewritten for vLLM: " + "; ".join(f"{c.rule}: {c.why}" for c in failed))
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = AdapterConfig.from_pretrained(adapter_dir)
    tensors = io.read_tensors(adapter_dir)
    folded = {}
    for key, tensor in tensors.items():
        if key.endswith("lora_B.weight"):
            path = key[len(io.KEY_PREFIX) :].rsplit(".lora_B", 1)[0]
            tensor = tensor.float() * lora_module_scale(config, path)
        folded[key] = tensor.contiguous()
    rank = max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    plain = config.replace(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={},
                           alpha_pattern={})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.float32) for k, v in folded.items()}, str(out / io.WEIGHTS_NAME), metadata={"format": "pt"}
    )
    plain.save(out)
    if (adapter_dir / "README.md").is_file():
        shutil.copy(adapter_dir / "README.md", out / "README.md")
    return out


def _mergeable(config: AdapterConfig) -> bool:
    from deltatune.registry import get_method

    return get_method(config.peft_type).mergeable
