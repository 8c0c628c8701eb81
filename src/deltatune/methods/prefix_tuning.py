"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022, deep prompts): n trainable key/value vectors in
front of every attention layer's keys and values, which every token attends to as if n tokens came first.

The prefixes reach the model as a pre-filled key/value cache (transformers' `DynamicCache`, under the keyword the
model's forward takes: `cache` or `past_key_values`), so any family whose attention uses the Cache API works, with
grouped-query attention (the prefixes have the key/value heads) and encoders (P-tuning v2 on a classifier). The
stored table is peft's: (n, num_layers·2·kv_width), laid out per layer as key then value. With `prefix_projection`,
the table is computed by an MLP (Embedding(n, d) -> Linear -> tanh -> Linear) while training and saved as its output,
as peft saves it; a loaded adapter is the table.

Positions: the input's tokens come after the n prefix positions (the cache's length), as in peft. In `generate()`, n
placeholder ids stand for the cached prefix (the model skips cached positions) and are dropped from the output.

Encoder-decoder models (T5, BART) get the prefixes where peft puts them: in the decoder's self-attention, through an
`EncoderDecoderCache` whose cross-attention part starts empty (computed from the encoder's output as usual). peft
reads its table for decoder layer i from the table's layer block (2i mod L) (it lays two copies of the table side by
side and cuts them four blocks per layer, self then cross attention, then drops the cross-attention blocks); deltatune
reads the same blocks, so a file trained by either library gives the same outputs in the other. The encoder gets no
prefix (peft's layout has none for it). In `generate()`, n placeholder decoder ids stand for the prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache

from deltatune.errors import AdapterError, ConfigError
from deltatune.input_adapter import (
    InputAdapter,
    cache_argument,
    call_rows,
    count_in_lengths,
    extend_mask,
    input_call,
    input_embedding_target,
    prepend_placeholders,
)
from deltatune.layers import module_device
from deltatune.methods.prompt_learning import (
    PromptLearningConfig,
    TrainedTable,
    fill_from_model,
    loaded_table,
    model_sizes,
    saved_table,
)
from deltatune.models import is_encoder_decoder
from deltatune.registry import MethodSpec, register_method


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """peft's `PrefixTuningConfig` (peft_type PREFIX_TUNING); P-tuning v2 is this config (deep prompts in every layer),
    usually on an encoder for classification."""

    peft_type = "PREFIX_TUNING"
    kv_width_for_gqa: ClassVar[bool] = True

    encoder_hidden_size: int | None = None
    """Width of the reparameterization MLP (None: token_dim)."""
    prefix_projection: bool = False
    """True: the prefixes are an MLP's output while training (Li & Liang's reparameterization)."""
    init_weights: Literal["zero"] | None = None
    """"zero": the prefixes (or the MLP's last layer) start at zero."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f'init_weights must be None or "zero", got {self.init_weights!r}.')


class PrefixProjection(nn.Module):
    """Li & Liang's reparameterization: Embedding(n, d) -> Linear(d, h) -> tanh -> Linear(h, L·2·w)."""

    def __init__(self, n: int, d: int, hidden: int, out: int, zero: bool, device) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d, device=device)
        self.transform = nn.Sequential(
            nn.Linear(d, hidden, device=device), nn.Tanh(), nn.Linear(hidden, out, device=device)
        )
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> Tensor:
        return self.transform(self.embedding.weight)


class KeyValuePrefixes(InputAdapter):
    """The input embedding; per adapter, its key/value prefix table and the shape to read it with."""

    adapter_param_names = ("prefix_key_values",)
    adapter_other_names = ("prefix_shape",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prefix_key_values = nn.ModuleDict()
        self.prefix_shape: dict[str, tuple[int, int, int]] = {}

    def add_adapter(self, name: str, *, config: PrefixTuningConfig) -> None:
        n, d, layers, heads = config.num_virtual_tokens, config.token_dim, config.num_layers, config.num_attention_heads
        if d % heads:
            raise ConfigError(f"token_dim={d} is not a multiple of num_attention_heads={heads}.")
        device, width = module_device(self.base_layer), layers * 2 * d
        zero = config.init_weights == "zero"
        if config.prefix_projection and not config.inference_mode:
            module = PrefixProjection(n, d, config.encoder_hidden_size or d, width, zero, device)
        else:
            module = TrainedTable(
                torch.zeros(n, width, device=device) if zero else torch.randn(n, width, device=device)
            )
        self.prefix_key_values[name] = module
        self.prefix_shape[name] = (layers, heads, d // heads)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return saved_table(self.prefix_key_values[name]) if name in self.prefix_key_values else {}

    def load_adapter_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.prefix_key_values[name] = loaded_table(tensors, self.prefix_key_values[name])

    def prepare(self, name: str, call: dict[str, Any], generating: bool, model: nn.Module) -> int:
        table = self.prefix_key_values[name]()
        n = table.shape[0]
        batch, _ = call_rows(call)
        if generating:
            if call.get("inputs_embeds") is not None:
                raise AdapterError("generate() with key/value prefixes needs input_ids (not inputs_embeds).")
            batch *= _expansion(call, model)
        if is_encoder_decoder(model):
            call[cache_argument(model)] = decoder_prefix_cache(table, batch, self.prefix_shape[name], model)
            return _prepend_decoder_prefix(call, n, generating, model)
        call[cache_argument(model)] = prefix_cache(table, batch, self.prefix_shape[name], model)
        if call.get("position_ids") is not None:
            call["position_ids"] = call["position_ids"] + n  # the input comes after the prefix (peft's positions)
        if generating:  # placeholders stand for the cached prefix; generate skips cached positions
            prepend_placeholders(call, n, generating, model)
            return n
        extend_mask(call, n)
        return 0


def _expansion(call: dict[str, Any], model: nn.Module) -> int:
    """How many rows `generate` makes of each input row (beams, returned sequences): the cache it is given is not
    expanded with them."""
    config = call.get("generation_config") or getattr(model, "generation_config", None)
    beams = call.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = call.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return max(beams, returned)


def _prepend_decoder_prefix(call: dict[str, Any], n: int, generating: bool, model: nn.Module) -> int:
    """The decoder's side of n cached prefix positions: its attention mask (if given) attends to them; in
    `generate()`, n placeholder decoder ids stand for them (returned: the output's columns to drop)."""
    mask = call.get("decoder_attention_mask")
    if mask is not None:
        call["decoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    if not generating:
        return 0
    start = call.get("decoder_input_ids")
    if start is None:
        config = call.get("generation_config") or getattr(model, "generation_config", None)
        token = getattr(config, "decoder_start_token_id", None)
        token = token if token is not None else getattr(model.config, "decoder_start_token_id", None)
        if token is None:
            raise AdapterError(
                f"{type(model).__name__} has no decoder_start_token_id: pass decoder_input_ids to generate()."
            )
        batch, device = call_rows(call)
        start = torch.full((batch, 1), int(token), dtype=torch.long, device=device)
    # the placeholders are the start token: generate() puts one in front of decoder ids that do not begin with it
    call["decoder_input_ids"] = torch.cat([start[:, :1].expand(-1, n), start], dim=1)
    if mask is None:  # a mask as long as the ids tells generate() that the cache holds their first n positions
        call["decoder_attention_mask"] = torch.ones_like(call["decoder_input_ids"])
    count_in_lengths(call, n, model)
    return n


def decoder_prefix_cache(
    table: Tensor, batch: int, shape: tuple[int, int, int], model: nn.Module
) -> EncoderDecoderCache:
    """An EncoderDecoderCache with the prefixes in the decoder's self-attention, peft's layout: decoder layer i reads
    the table's layer block (2i mod layers); the cross-attention cache starts empty."""
    layers = shape[0]
    decoder = prefix_cache(table, batch, shape, model, block=lambda layer: (2 * layer) % layers)
    return EncoderDecoderCache(decoder, DynamicCache(config=model.config))


def prefix_cache(
    table: Tensor, batch: int, shape: tuple[int, int, int], model: nn.Module, block: Callable[[int], int] = int
) -> DynamicCache:
    """A DynamicCache holding the prefixes: layer i's keys and values are the columns [2j·w, (2j+1)·w) and
    [(2j+1)·w, (2j+2)·w) of the table, j = `block(i)` (i itself but in peft's encoder-decoder layout), as
    (batch, heads, n, head_dim), in the model's dtype."""
    layers, heads, head_dim = shape
    dtype = getattr(model, "dtype", table.dtype)
    per_layer = table.to(dtype).view(table.shape[0], 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        key, value = (per_layer[2 * block(layer) + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
        cache.update(key, value, layer)
    return cache


def prefix_kwargs(config: PrefixTuningConfig, module_path: str) -> dict[str, Any]:
    return {"config": config}


def _fill(config: PrefixTuningConfig, model: nn.Module) -> PrefixTuningConfig:
    config, sizes = fill_from_model(config, model), model_sizes(model)
    if config.num_layers != sizes.layers:
        raise ConfigError(
            f"num_layers={config.num_layers} but the model has {sizes.layers} layers: every layer needs its prefix."
        )
    if sizes.decoder_layers != sizes.layers:  # peft's layout gives decoder layer i the table's block (2i mod layers)
        raise ConfigError(
            f"{type(model).__name__} has {sizes.layers} encoder and {sizes.decoder_layers} decoder layers; prefix "
            "tuning (peft's table layout) needs as many of each. Use prompt tuning or LoRA on this model."
        )
    return config


register_method(
    MethodSpec(
        peft_type="PREFIX_TUNING",
        mergeable=False,
        config_cls=PrefixTuningConfig,
        kind="input",
        module_key_prefix="base_model.",
        layers={nn.Module: KeyValuePrefixes},
        layer_kwargs=prefix_kwargs,
        param_prefix="prefix_key_values",
        fill_from_model=_fill,
        with_defaults=lambda config, model_type: config,
        select_targets=input_embedding_target,
        input_context=input_call,
    )
)
