"""LLaMA-Adapter (Zhang et al. 2023, arXiv:2303.16199): learnable adaption prompts in the top L layers' attention,
attended through their own softmax and added with a zero-initialised gate, so training starts exactly at the base.

Per adapted attention module: a prompt P (1, adapter_len, d) and a scalar gate g (peft's layout and keys:
`...self_attn.adaption_prompt`, `...self_attn.adaption_gate`; the paper's code has one gate per head, squashed by
tanh). With Q the layer's queries (rotary positions applied), K = k_proj(P) and V = v_proj(P) (key/value heads
repeated for grouped-query attention), the layer's output gains o_proj(g · softmax(Q Kᵀ / √head_dim) V).

Supported: families whose attention module holds distinct q/k/v/o projections (the architecture table's rows whose
four projections share one parent module: LLaMA, Mistral, Qwen2), with rotary positions passed as the attention's
`position_embeddings`. GPT-2 (one fused q/k/v projection) and BERT-style encoders (output projection outside the
attention module) are refused with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.layers import AdapterLayer, Unmergeable, module_device
from deltatune.models import arch_for, find_layer_list, is_encoder_decoder, model_type_of
from deltatune.registry import MethodSpec, register_method


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """peft's `AdaptionPromptConfig` (peft_type ADAPTION_PROMPT)."""

    peft_type = "ADAPTION_PROMPT"

    adapter_len: int | None = None
    """Prompt tokens per adapted layer (the paper: 10)."""
    adapter_layers: int | None = None
    """How many of the top layers are adapted (the paper: 30 of LLaMA-7B's 32)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("adapter_len", "adapter_layers"):  # None until the adapter is added, as in peft
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer (peft has no default), got {value!r}.")
        for name in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if getattr(self, name) not in (None, []):
                raise ConfigError(f"{name} is not used by adaption prompts (adapter_layers picks the top layers).")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            if out.get(name) in (None, []):  # fields peft's AdaptionPromptConfig lacks: not written when unused
                out.pop(name, None)
        return out


def rotate_half(x: Tensor) -> Tensor:
    """The rotary rotation's pairing: (x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def gated_prompt_attention(
    query: Tensor, prompt_keys: Tensor, prompt_values: Tensor, gate: Tensor
) -> Tensor:  # fmt: skip
    """g · softmax(Q Kᵀ / √head_dim) V over the prompt positions only: (B, H, T, hd) x (B, H, L, hd) -> (B, H, T, hd);
    the softmax in float32."""
    scores = query @ prompt_keys.transpose(2, 3).to(query.dtype) / math.sqrt(query.shape[-1])
    weights = gate.to(query.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return weights @ prompt_values.to(query.dtype)


class AdaptedAttention(Unmergeable, AdapterLayer):
    """An attention module whose output gains each active adapter's gated prompt attention."""

    merge_refusal = (
        "an adaption prompt adds its own attention over prompt tokens, not a change of weights: it cannot be merged "
        "into the model; keep it as an adapter."
    )

    adapter_param_names = ("adaption_prompt", "adaption_gate")
    adapter_other_names = ("projection_names",)
    rows_independent = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.projection_names: dict[str, tuple[str, str, str, str]] = {}

    def add_adapter(self, name: str, *, adapter_len: int) -> None:
        _, projections = _projections(getattr(getattr(self.base_layer, "config", None), "model_type", None))
        q_proj = self.base_layer.get_submodule(projections[0])
        device = module_device(self.base_layer)
        self.adaption_prompt[name] = nn.Parameter(torch.randn(1, adapter_len, q_proj.in_features, device=device))
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=device))
        self.projection_names[name] = projections

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = self.unmerged_active()
        if not names:
            return out
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings")
        if rotary is None and len(args) > 1 and isinstance(args[1], tuple):  # (cos, sin) passed by position
            rotary = args[1]
        attended = out[0] if isinstance(out, tuple) else out
        for name in names:
            attended = attended + self._prompt_term(name, hidden, rotary)
        return (attended, *out[1:]) if isinstance(out, tuple) else attended

    def _prompt_term(self, name: str, hidden: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        q_proj, k_proj, v_proj, o_proj = (self.base_layer.get_submodule(n) for n in self.projection_names[name])
        head_dim = self.base_layer.head_dim
        batch, length, _ = hidden.shape
        query = q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        if rotary is not None:
            cos, sin = (t.unsqueeze(1) for t in rotary)
            query = query * cos + rotate_half(query) * sin
        prompt = self.adaption_prompt[name].to(hidden.dtype)
        keys, values = (
            proj(prompt).view(1, prompt.shape[1], -1, head_dim).transpose(1, 2) for proj in (k_proj, v_proj)
        )
        repeat = query.shape[1] // keys.shape[1]  # grouped-query attention: each key/value head serves `repeat`
        keys, values = (t.repeat_interleave(repeat, dim=1).expand(batch, -1, -1, -1) for t in (keys, values))
        attended = gated_prompt_attention(query, keys, values, self.adaption_gate[name])
        return o_proj(attended.transpose(1, 2).reshape(batch, length, -1))


def _projections(model_type: str | None) -> tuple[str, tuple[str, str, str, str]]:
    """(attention module suffix, its q/k/v/o projection names) from the architecture table, or why not."""
    arch = arch_for(model_type)
    names = (arch.attn_q, arch.attn_k, arch.attn_v, arch.attn_o)
    parents = {n.rsplit(".", 1)[0] for n in names if n and "." in n}
    if None in names or len(set(names)) < 4 or len(parents) != 1:
        raise ConfigError(
            f"adaption prompts need an attention module with separate q/k/v/o projections; {model_type!r} "
            "is not such a family in deltatune.models (supported: LLaMA, Mistral, Qwen2 and other rows like them)."
        )
    return parents.pop(), tuple(n.rsplit(".", 1)[1] for n in names)  # type: ignore[return-value]


def adapted_attention_targets(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    """The attention modules of the top `adapter_layers` layers (peft: the last matches of `target_modules`)."""
    if is_encoder_decoder(model):
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model; adaption prompts sit in a decoder-only model's "
            "self-attention (LLaMA-style). Use prompt tuning or prefix tuning on encoder-decoder models."
        )
    suffix, _ = _projections(model_type_of(model))
    suffix = config.target_modules if isinstance(config.target_modules, str) else suffix
    layer_list, layers = find_layer_list(model)
    if config.adapter_layers > len(layers):
        raise ConfigError(f"adapter_layers={config.adapter_layers} but the model has {len(layers)} layers.")
    found = [f"{layer_list}.{i}.{suffix}" for i in range(len(layers) - config.adapter_layers, len(layers))]
    missing = [name for name in found if not _has(model, name)]
    if missing:
        raise ConfigError(f"no attention module {missing[0]!r}; set target_modules to the attention's name.")
    return found


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def adaption_defaults(config: AdaptionPromptConfig, model_type: str | None) -> AdaptionPromptConfig:
    """target_modules: the attention module's name (peft saves it, e.g. "self_attn")."""
    for name in ("adapter_len", "adapter_layers"):
        if getattr(config, name) is None:
            raise ConfigError(f"{name} is not set: give it a positive integer (the paper: adapter_len=10).")
    suffix, _ = _projections(model_type)
    return config if config.target_modules else config.replace(target_modules=suffix)


def adaption_kwargs(config: AdaptionPromptConfig, module_path: str) -> dict[str, Any]:
    return {"adapter_len": config.adapter_len}


register_method(
    MethodSpec(
        peft_type="ADAPTION_PROMPT",
        mergeable=False,
        config_cls=AdaptionPromptConfig,
        kind="layer",
        layers={nn.Module: AdaptedAttention},
        layer_kwargs=adaption_kwargs,
        param_prefix="adaption_",
        with_defaults=adaption_defaults,
        select_targets=adapted_attention_targets,
    )
)
