"""Architecture table: where things are in each transformers model family (one row per `model_type`).

Methods ask this table ("where is the layer list", "what does LoRA target by default") instead of naming model
families themselves. A new family is one row; unknown families fall back to `GENERIC`, found by inspection.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ArchSpec:
    """Semantic locations inside one model family (module names are suffixes within a layer)."""

    embeddings: str
    layers: str
    attn_q: str | None
    attn_k: str | None
    attn_v: str | None
    attn_o: str | None
    mlp_up: str | None
    mlp_down: str | None
    mlp_gate: str | None = None
    heads_attr: str = "num_attention_heads"
    lora_targets: tuple[str, ...] = ()
    """Default LoRA targets when `target_modules` is not given (peft's defaults)."""
    norms: tuple[str, ...] = ()
    """Names (suffixes) of the normalization layers: inside each block and the final one."""


_LLAMA_LIKE = ArchSpec(
    embeddings="model.embed_tokens",
    layers="model.layers",
    attn_q="self_attn.q_proj",
    attn_k="self_attn.k_proj",
    attn_v="self_attn.v_proj",
    attn_o="self_attn.o_proj",
    mlp_up="mlp.up_proj",
    mlp_down="mlp.down_proj",
    mlp_gate="mlp.gate_proj",
    lora_targets=("q_proj", "v_proj"),
    norms=("input_layernorm", "post_attention_layernorm", "norm"),
)
_BERT_LIKE_PREFIX = {"bert": "bert", "roberta": "roberta"}

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": ArchSpec(
        embeddings="transformer.wte",
        layers="transformer.h",
        attn_q="attn.c_attn",
        attn_k="attn.c_attn",
        attn_v="attn.c_attn",
        attn_o="attn.c_proj",
        mlp_up="mlp.c_fc",
        mlp_down="mlp.c_proj",
        heads_attr="n_head",
        lora_targets=("c_attn",),
        norms=("ln_1", "ln_2", "ln_f"),
    ),
    **{
        family: ArchSpec(
            embeddings=f"{prefix}.embeddings.word_embeddings",
            layers=f"{prefix}.encoder.layer",
            attn_q="attention.self.query",
            attn_k="attention.self.key",
            attn_v="attention.self.value",
            attn_o="attention.output.dense",
            mlp_up="intermediate.dense",
            mlp_down="output.dense",
            lora_targets=("query", "value"),
            norms=("LayerNorm",),
        )
        for family, prefix in _BERT_LIKE_PREFIX.items()
    },
    "t5": ArchSpec(
        embeddings="shared",
        layers="encoder.block",
        attn_q="layer.0.SelfAttention.q",
        attn_k="layer.0.SelfAttention.k",
        attn_v="layer.0.SelfAttention.v",
        attn_o="layer.0.SelfAttention.o",
        mlp_up="layer.1.DenseReluDense.wi",
        mlp_down="layer.1.DenseReluDense.wo",
        heads_attr="num_heads",
        lora_targets=("q", "v"),
        norms=("layer_norm", "final_layer_norm"),
    ),
    "vit": ArchSpec(  # transformers >= 5 names (peft's table still says query / value, the 4.x names)
        embeddings="vit.embeddings",
        layers="vit.layers",
        attn_q="attention.q_proj",
        attn_k="attention.k_proj",
        attn_v="attention.v_proj",
        attn_o="attention.o_proj",
        mlp_up="mlp.fc1",
        mlp_down="mlp.fc2",
        lora_targets=("q_proj", "v_proj"),
        norms=("layernorm_before", "layernorm_after", "layernorm"),
    ),
}

GENERIC = ArchSpec(
    embeddings="",
    layers="",
    attn_q=None,
    attn_k=None,
    attn_v=None,
    attn_o=None,
    mlp_up=None,
    mlp_down=None,
    lora_targets=(),
)


def arch_for(model_type: str | None) -> ArchSpec:
    """The row for `model_type`, or the generic fallback."""
    return ARCHS.get(model_type or "", GENERIC)


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether `model` (a transformers model) has an encoder and a decoder (T5, BART)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def context_length(model: nn.Module) -> int | None:
    """The most positions the model reads (its config's `max_position_embeddings` / `n_positions`), if it says."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return length if isinstance(length, int) else None


def output_head_name(model: nn.Module) -> str | None:
    """Module name of the model's output head (transformers' `get_output_embeddings`), or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's repeated blocks: the table's entry, else the longest nn.ModuleList found."""
    spec = arch_for(model_type_of(model))
    if spec.layers:
        try:
            return spec.layers, model.get_submodule(spec.layers)
        except AttributeError:
            pass  # a head model wraps the base under another prefix: fall through to inspection
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise LookupError(f"{type(model).__name__} has no nn.ModuleList of layers; pass layer names explicitly.")
    return max(lists, key=lambda item: len(item[1]))


def default_lora_targets(model_type: str | None) -> list[str] | str | None:
    """LoRA's default targets for a family (peft's table); None for a family without one: the user picks (never
    silently "all-linear")."""
    targets = arch_for(model_type).lora_targets
    return list(targets) if targets else None


_LINEAR_TYPES: list[type[nn.Module]] = [nn.Linear, Conv1D]
"""Module types that are linear layers (what "all-linear" targets): torch's, GPT-2's Conv1D (a linear layer storing
its weight transposed) and types registered by other modules (e.g. 4-bit linears)."""


def register_linear_type(module_type: type[nn.Module]) -> None:
    """Declare another module type a linear layer (it must state `in_features` / `out_features`)."""
    if module_type not in _LINEAR_TYPES:
        _LINEAR_TYPES.append(module_type)


def linear_types() -> tuple[type[nn.Module], ...]:
    return tuple(_LINEAR_TYPES)


def linear_features(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a linear-like module: GPT-2's Conv1D stores its weight as (d_in, d_out);
    nn.Linear and quantized linears state `in_features` / `out_features`."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    return module.in_features, module.out_features, False


def last_linear_width(module: nn.Module) -> int | None:
    """Output features of the last linear-like layer inside `module` (itself included): a block's residual-stream
    width; None when it holds none."""
    linears = [m for m in module.modules() if isinstance(m, linear_types())]
    return linear_features(linears[-1])[1] if linears else None
