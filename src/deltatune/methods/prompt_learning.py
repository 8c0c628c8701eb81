"""What prompt tuning, P-tuning and prefix tuning share: peft's `PromptLearningConfig` fields, filled from the model
as peft fills them (and saves them), and the sizes of the model they are read from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune import io
from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.models import context_length, is_encoder_decoder

SAVED_KEY = "prompt_embeddings"
"""peft's one key for these methods' tensors, at the top of the file."""

_MODULE_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
"""Base fields about which modules to wrap: meaningless for virtual tokens (peft's prompt configs lack them)."""


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields of peft's prompt-learning configs. The sizes left None are read from the model when the adapter is
    added (hidden size, layer count, attention heads; for key/value prefixes on grouped-query attention, the key/value
    width and head count, as peft does) and saved filled in."""

    num_virtual_tokens: int | None = None
    """n: how many virtual tokens the adapter adds."""
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    """1 for decoder-only and encoder models, 2 for encoder-decoder models (peft's field; read from the model)."""
    num_attention_heads: int | None = None
    num_layers: int | None = None
    kv_width_for_gqa: ClassVar[bool] = False
    """True where `token_dim` / heads mean the key/value width and head count (prefixes on grouped-query models)."""

    def __post_init__(self) -> None:
        for name in _MODULE_FIELDS:
            if getattr(self, name) not in (None, []):
                raise ConfigError(
                    f"{name} is set, but {type(self).__name__} adds virtual tokens at the model's input and wraps no "
                    f"chosen modules: remove {name}."
                )
        super().__post_init__()
        tokens = self.num_virtual_tokens  # None until the adapter is added (`fill_from_model` refuses it), as in peft
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0):
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {tokens!r}.")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"num_transformer_submodules must be 1 (decoder-only and encoder models), 2 (encoder-decoder models) "
                f"or None (read from the model), got {self.num_transformer_submodules!r}."
            )
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None (read from the model), got {value!r}.")

    def needs_target_modules(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in _MODULE_FIELDS:
            out.pop(name, None)
        return out


@dataclass(frozen=True)
class ModelSizes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    encoder_decoder: bool
    decoder_layers: int
    """The decoder's layers (equal to `layers` but in encoder-decoder models, where they may differ)."""


def model_sizes(model: nn.Module) -> ModelSizes:
    """Sizes from a transformers model's config under any of its families' field names."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no transformers config to read its sizes from.")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> Any:
        return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)

    hidden, layers = first("hidden_size", "n_embd", "d_model"), first("num_hidden_layers", "num_layers", "n_layer")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if None in (hidden, layers, heads):
        raise ConfigError(
            f"cannot read the hidden size, layer count and head count of {type(model).__name__} from its config; "
            "set token_dim, num_layers and num_attention_heads in the adapter config."
        )
    return ModelSizes(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=first("num_key_value_heads") or heads,
        head_dim=first("head_dim", "d_kv") or hidden // heads,  # T5's d_kv: mT5's heads x d_kv is not d_model
        encoder_decoder=is_encoder_decoder(model),
        decoder_layers=first("num_decoder_layers", "decoder_layers") or layers,
    )


def fill_from_model(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """peft's filling of the unset sizes (`MethodSpec.fill_from_model`), with `num_transformer_submodules` 2 on an
    encoder-decoder model and 1 otherwise (a value that contradicts the model is refused)."""
    if config.num_virtual_tokens is None:
        raise ConfigError("num_virtual_tokens is not set: give the number of virtual tokens (e.g. 20).")
    sizes = model_sizes(model)
    submodules = 2 if sizes.encoder_decoder else 1
    if config.num_transformer_submodules not in (None, submodules):
        kind = "an encoder-decoder" if sizes.encoder_decoder else "a decoder-only or encoder"
        raise ConfigError(
            f"num_transformer_submodules={config.num_transformer_submodules}, but {type(model).__name__} is {kind} "
            f"model ({submodules}): leave it unset (read from the model) or set {submodules}."
        )
    context = context_length(model)
    if context is not None and config.num_virtual_tokens >= context:
        raise ConfigError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for the input: "
            f"{type(model).__name__} reads at most {context} positions, virtual tokens included. Use fewer virtual "
            "tokens (tens are usual)."
        )
    grouped = type(config).kv_width_for_gqa  # peft: key/value sizes (equal to the hidden ones without GQA)
    return config.replace(
        token_dim=config.token_dim or (sizes.head_dim * sizes.kv_heads if grouped else sizes.hidden),
        num_attention_heads=config.num_attention_heads or (sizes.kv_heads if grouped else sizes.heads),
        num_layers=config.num_layers or sizes.layers,
        num_transformer_submodules=submodules,
    )


class TrainedTable(nn.Module):
    """A table of rows (virtual token embeddings, or key/value prefixes) trained as it is."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self) -> Tensor:
        return self.weight


def saved_table(source: nn.Module) -> dict[str, Tensor]:
    """What an adapter whose rows come from `source` saves: the table itself, or a reparameterization's output
    (P-tuning's encoder, a prefix projection), folded as peft saves it."""
    rows = source.weight if isinstance(source, TrainedTable) else source().detach()
    return {io.ROOT_MARK + SAVED_KEY: rows}


@torch.no_grad()
def loaded_table(tensors: dict[str, Tensor], source: nn.Module) -> TrainedTable:
    """The saved table as the adapter's new source, on `source`'s device and in its dtype (a loaded adapter is its
    table, whatever produced it while training)."""
    like = next(source.parameters())
    return TrainedTable(tensors[io.ROOT_MARK + SAVED_KEY].to(device=like.device, dtype=like.dtype).clone())
