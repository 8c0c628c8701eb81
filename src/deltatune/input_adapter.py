"""Input adapters: methods that change what flows into the model (virtual tokens before the input, key/value
prefixes in every attention) instead of its weights.

An `InputAdapter` wraps the model's input embedding, so the core manages it like any other wrapper (names, active
adapters, disable, save/load), and adds one step: before each `forward` / `generate` of the `PeftModel`, the active
adapter rewrites the call's keyword arguments (`prepare`), through the method's `input_context`
(`input_call`). Virtual tokens are passed as placeholder ids that the wrapped embedding replaces by the adapter's
rows, so the model sees them as ordinary tokens in front of the input: its own attention mask, position and cache
handling apply unchanged, in training and in `generate()` (whose output then loses the placeholder columns).
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import AdapterError, ConfigError
from deltatune.layers import AdapterLayer, Unmergeable

IGNORE_INDEX = -100
"""Label of positions left out of the loss (transformers' convention)."""


class InputAdapter(Unmergeable, AdapterLayer):
    """The model's input embedding plus, per adapter, what that adapter feeds the model.

    Subclasses implement `add_adapter` and `prepare(name, call, generating)`, which rewrites the call's keyword
    arguments in place and returns how many leading columns of `generate()`'s output are placeholders.
    """

    merge_refusal = (
        "an input adapter adds virtual tokens or key/value prefixes to each call, not a change of weights: it cannot "
        "be merged into the model; keep it as an adapter."
    )

    rows_independent = False  # virtual tokens change the sequence of the whole batch

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.pending_rows: Tensor | None = None
        """Set by `prepare` for one call: (n, d) rows that replace the first n embedded positions."""

    def forward(self, input_ids: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base_layer(input_ids, *args, **kwargs)
        rows, self.pending_rows = self.pending_rows, None  # the call's first embedding holds the placeholders
        if rows is None:
            return out
        n = rows.shape[0]
        return torch.cat([rows.to(out.dtype).expand(out.shape[0], -1, -1), out[:, n:]], dim=1)

    @abc.abstractmethod
    def prepare(self, name: str, call: dict[str, Any], generating: bool, model: nn.Module) -> int:
        """Rewrite `call` (the keyword arguments of one forward / generate) for adapter `name`; return the number of
        placeholder columns `generate()`'s output starts with."""


def input_embedding_target(model: nn.Module, config: Any) -> list[str]:
    """The module name of the model's input embedding (transformers' `get_input_embeddings`): where an input adapter
    sits (a `MethodSpec.select_targets`)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
    if name is None:
        raise ConfigError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings): virtual tokens need one."
        )
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(
            f"{type(model).__name__}'s input embedding is a {type(embedding).__name__}, not a table of token "
            "embeddings: virtual tokens go in front of token ids, and this model reads none (an image model's "
            "patches). Use LoRA (with modules_to_save for a new head) on such a model."
        )
    return [name]


@contextlib.contextmanager
def input_call(
    model: nn.Module, args: tuple, kwargs: dict[str, Any], generating: bool
) -> Iterator[Callable[[Any], Any] | None]:
    """Around one forward / generate (`MethodSpec.input_context`): the active input adapter rewrites the call; the
    yielded function drops placeholder columns from `generate()`'s output."""
    adapter = next((m for m in model.modules() if isinstance(m, InputAdapter)), None)
    names = adapter.unmerged_active() if adapter is not None else []
    if not names or _continues(kwargs):  # a cache that holds tokens already holds the virtual ones
        yield None
        return
    if len(names) > 1:
        raise AdapterError(
            f"adapters {names} each add their own virtual tokens; activate one at a time (set_adapter(name))."
        )
    placeholders = adapter.prepare(names[0], kwargs, generating, model)
    try:
        yield (lambda out: drop_columns(out, placeholders)) if generating and placeholders else None
    finally:
        adapter.pending_rows = None


def _continues(call: dict[str, Any]) -> bool:
    cache = call.get("cache", call.get("past_key_values"))
    return cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0)


def drop_columns(outputs: Any, n: int) -> Any:
    """`generate()`'s sequences without their first n columns (a tensor, or an output object's `.sequences`)."""
    if isinstance(outputs, Tensor):
        return outputs[:, n:]
    outputs.sequences = outputs.sequences[:, n:]
    return outputs


def call_input(call: dict[str, Any]) -> Tensor:
    """The call's input: its ids (`input_ids`, or generate's `inputs`) or its embeddings."""
    tokens = next((call[k] for k in ("input_ids", "inputs", "inputs_embeds") if call.get(k) is not None), None)
    if tokens is None:
        raise AdapterError("the call has neither input_ids nor inputs_embeds: virtual tokens need an input.")
    return tokens


def call_rows(call: dict[str, Any]) -> tuple[int, torch.device]:
    """(batch size, device) of a call, from its ids or embeddings."""
    tokens = call_input(call)
    return tokens.shape[0], tokens.device


def extend_mask(call: dict[str, Any], n: int) -> None:
    """Attend to n more leading positions: the attention mask gets n ones in front (made whole-ones if absent)."""
    tokens = call_input(call)
    mask = call.get("attention_mask")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    front = torch.ones(tokens.shape[0], n, dtype=mask.dtype, device=tokens.device)
    call["attention_mask"] = torch.cat([front, mask], dim=1)


def prepend_virtual_tokens(call: dict[str, Any], rows: Tensor, generating: bool, model: nn.Module) -> int:
    """Put the (n, d) `rows` in front of the call's input as n virtual tokens: before its embeddings if it passes
    `inputs_embeds`, else as n placeholder ids (the embedding replaces them by `rows`); returns the placeholder
    count (0 with embeddings)."""
    n = rows.shape[0]
    embeds = call.get("inputs_embeds")
    if embeds is not None:
        shift_inputs(call, n, embeds.shape[1])
        front = rows.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        call["inputs_embeds"] = torch.cat([front, embeds], dim=1)
        return 0
    prepend_placeholders(call, n, generating, model)
    return n


def prepend_encoder_tokens(call: dict[str, Any], rows: Tensor, embedding: nn.Module) -> None:
    """Put the (n, d) `rows` in front of an encoder-decoder call's encoder input, as embeddings (peft's way: the ids
    are embedded by the model's input embedding, `embedding`), with n ones in front of its attention mask. The
    decoder's inputs, labels and outputs are left as they are."""
    extend_mask(call, rows.shape[0])  # first: the mask is sized from the ids, which may leave the call below
    embeds = call.get("inputs_embeds")
    if embeds is None:
        embeds = embedding(call.pop("inputs" if call.get("inputs") is not None else "input_ids"))
    call["inputs_embeds"] = torch.cat([rows.to(embeds.dtype).expand(embeds.shape[0], -1, -1), embeds], dim=1)


def prepend_placeholders(call: dict[str, Any], n: int, generating: bool, model: nn.Module) -> None:
    """Put n placeholder ids in front of the input ids, with everything that goes with them (`shift_inputs`), and
    count them in `generate`'s length limits."""
    key = "inputs" if call.get("inputs") is not None else "input_ids"
    ids = call[key]
    shift_inputs(call, n, ids.shape[1])
    call[key] = torch.cat([ids.new_zeros(ids.shape[0], n), ids], dim=1)
    if generating:
        count_in_lengths(call, n, model)


def shift_inputs(call: dict[str, Any], n: int, length: int) -> None:
    """What goes with n tokens in front of an input of `length` tokens: n ones in front of the attention mask,
    labels ignored there, token type 0, positions 0..n-1 before the given ones shifted by n."""
    extend_mask(call, n)
    labels = call.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
        call["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)
    if call.get("token_type_ids") is not None:
        types = call["token_type_ids"]
        call["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
    if call.get("position_ids") is not None:
        positions = call["position_ids"]
        front = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
        call["position_ids"] = torch.cat([front, positions + n], dim=1)


def count_in_lengths(call: dict[str, Any], n: int, model: nn.Module) -> None:
    """`generate`'s max_length / min_length count the input too: add the n placeholder columns (max_new_tokens does
    not need it). Without either limit, the generation config's max_length is used, shifted by n."""
    config = call.get("generation_config") or getattr(model, "generation_config", None)
    if call.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
        call["max_length"] = (call.get("max_length") or getattr(config, "max_length", None) or 20) + n
    if call.get("min_length"):
        call["min_length"] += n


def cache_argument(model: nn.Module) -> str:
    """The keyword the model's forward takes its key/value cache under ("cache" in newer transformers,
    "past_key_values" before), read from its backbone's signature."""
    backbone = getattr(model, "base_model", model)
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
