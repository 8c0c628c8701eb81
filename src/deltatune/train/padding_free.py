"""Padding-free micro-batches: a micro-batch's examples laid out in one row, each attending only to its own tokens.

Right-padding a batch to its longest example wastes every padded position in every matmul (10-12% of the
quickstart's FLOPs). Here the examples go into one row instead, positions restart at each example (`position_ids`),
and attention stays within each example, so the loss is that of the padded batch, without the padding.

Two more kinds of position do no work and are left out:
- **shared prompt prefixes**: examples that open with the same tokens (the chat template's header, a shared
  instruction) compute them once. A prompt token whose successor is no response token predicts nothing, so its
  hidden states are the same function of the same tokens in every example that has it: the row holds it once and
  each later example attends to it before its own tokens (`prefix_rows`). Its gradient is the sum of what each
  example sends back, exactly as when the examples run apart. 27% of the quickstart's tokens.
- **trailing tokens**: an example's tokens after its last predicting position (the final token of every example)
  feed nothing that is scored.

transformers routes attention through `AttentionInterface`: while a run trains, the model's `_attn_implementation`
names this module's function, which attends per example when given `segment_lengths` (one SDPA call per example:
causal over its own tokens, after the shared rows it opens with, gathered by index), and is transformers' SDPA
otherwise. A model is used this way only after a probe showed its logits in both layouts (end to end, shared
prefix) equal the per-example ones (`padding_free_supported`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from deltatune.train.data import Example

SEGMENTS = "deltatune_segments"
_registered = False


def _segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = kwargs.pop("segment_lengths", None)
    prefix_lengths, prefix_rows = kwargs.pop("prefix_lengths", None), kwargs.pop("prefix_rows", None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    # grouped-query attention (each key/value head serves several query heads) is SDPA's own: no repeated copy
    gqa = query.shape[1] != key.shape[1]
    lengths = _as_list(lengths)
    prefixes = _as_list(prefix_lengths) if prefix_lengths is not None else [0] * len(lengths)
    # split, and gather once, rather than slice per example: the backward of a slice (or an index_select) writes a
    # zero gradient of the whole row and adds it, once per example (~6% of the quickstart's step); a split's is one
    # cat, one gather's one index_add
    queries = query.split(lengths, 2)
    masks: list[Tensor | None] = [None] * len(lengths)  # None: causal over the example's own tokens
    if prefix_rows is None or not any(prefixes):
        keys, values = key.split(lengths, 2), value.split(lengths, 2)
    else:  # each example's keys/values: the shared prefix it opens with (all of it visible), then its own tokens
        index, sizes, masks = _gather_index(prefix_rows, tuple(lengths), tuple(prefixes))
        keys, values = key.index_select(2, index).split(sizes, 2), value.index_select(2, index).split(sizes, 2)
    parts = [
        nn.functional.scaled_dot_product_attention(
            q, k, v, mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa
        )
        for q, k, v, mask in zip(queries, keys, values, masks, strict=True)
    ]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


@dataclasses.dataclass(frozen=True)
class _GatherIndex:
    """One forward's gather layout, which every layer of it shares. Holding `prefix_rows` keeps its id from being
    reused by another tensor while this is cached."""

    prefix_rows: Tensor
    lengths: tuple
    prefixes: tuple
    index: Tensor  # row positions: each example's shared prefix, then its own tokens, end to end
    sizes: list[int]  # each example's count in `index`
    masks: list[Tensor | None]  # all of the prefix, then its own tokens causally; None without a prefix (causal)

    def serves(self, prefix_rows: Tensor, lengths: tuple, prefixes: tuple) -> bool:
        return self.prefix_rows is prefix_rows and self.lengths == lengths and self.prefixes == prefixes


_last_index: _GatherIndex | None = None


def _gather_index(prefix_rows: Tensor, lengths: tuple, prefixes: tuple) -> tuple[Tensor, list[int], list]:
    """(index, sizes, masks) of `_GatherIndex` for one forward, built once for all its layers."""
    global _last_index
    if _last_index is not None and _last_index.serves(prefix_rows, lengths, prefixes):
        return _last_index.index, _last_index.sizes, _last_index.masks
    device = prefix_rows.device
    chains = prefix_rows.split(list(prefixes))
    starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    own = [torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths, strict=True)]
    index = torch.cat([t for pair in zip(chains, own, strict=True) for t in pair])
    sizes = [p + n for p, n in zip(prefixes, lengths, strict=True)]
    masks = [torch.ones(n, p + n, dtype=torch.bool, device=device).tril(p) if p else None
             for p, n in zip(prefixes, lengths, strict=True)]  # fmt: skip
    _last_index = _GatherIndex(prefix_rows, lengths, prefixes, index, sizes, masks)
    return index, sizes, masks


def _as_list(values) -> list[int]:
    return values.tolist() if isinstance(values, Tensor) else list(values)


def _register() -> bool:
    global _registered
    if not _registered:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        except ImportError:
            return False
        AttentionInterface.register(SEGMENTS, _segment_attention)
        AttentionMaskInterface.register(SEGMENTS, sdpa_mask)  # the SDPA fallback gets SDPA's mask
        _registered = True
    return True


@contextlib.contextmanager
def segment_attention(model: nn.Module) -> Iterator[None]:
    """While inside: `model`'s attention honours `segment_lengths` (restored on exit)."""
    _register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = SEGMENTS
    try:
        yield
    finally:
        config._attn_implementation = before


def padding_free_supported(model: nn.Module) -> bool:
    """Whether `model` (a transformers model, or a PeftModel around one) computes one-row layouts exactly as it
    computes the examples one by one: checked on short random rows, laid end to end and as a prefix tree."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") or not _register():
        return False
    embeddings = base.get_input_embeddings()
    vocab = getattr(embeddings, "base_layer", embeddings).num_embeddings  # the table itself, when a method wraps it
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, vocab, (3,), generator=g).tolist()
    rows = [shared + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (2, 3)]
    # every token predicts (labels from the second on), so the end-to-end layout shares nothing; the tree shares
    # the 2 tokens before each row's first predicting position
    everything = [Example(r, [-1] + r[1:]) for r in rows]
    from_shared = [Example(r, [-1] * 3 + r[3:]) for r in rows]
    device = next(base.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([r], device=device)).logits[0] for r in rows]
            for examples in (everything, from_shared):
                layout = collate_flat(examples, ignore=-1)
                with segment_attention(base):
                    packed = model(**{k: v.to(device) for k, v in model_inputs(layout).items()}).logits[0]
                own = layout["position_ids"][0].split(layout["segment_lengths"].tolist())
                want = torch.cat([a[p.to(device)] for a, p in zip(alone, own, strict=True)])
                if packed.shape != want.shape or not torch.allclose(packed, want, rtol=1e-4, atol=1e-4):
                    return False
    except (TypeError, ValueError, RuntimeError):  # a forward that refuses the inputs
        return False
    finally:
        model.train(was_training)
    return True


def _predicting(example: Example, ignore: int) -> list[int]:
    """Positions whose next token is a label (position t predicts labels[t + 1])."""
    labels = example.labels
    return [t for t in range(len(labels) - 1) if labels[t + 1] != ignore]


def collate_flat(examples: list[Example], ignore: int, share_prefixes: bool = True) -> dict[str, Tensor]:
    """The micro-batch as one row: input_ids, position_ids (each token's position in its example), next_targets
    (the label each position predicts, `ignore` where none), attention_mask (ones), segment_lengths (each example's
    own tokens, which follow one another in the row) and, where examples share tokens, prefix_lengths and
    prefix_rows (the row indices of the shared tokens each example attends to before its own, concatenated).

    Positions before an example's first predicting position predict nothing: with `share_prefixes` they are shared
    with any earlier example that opens with the same tokens. Positions after its last predicting one are left out
    (their outputs feed nothing that is scored). An example with nothing to predict adds no tokens."""
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    lengths: list[int] = []  # each example's own tokens (they follow one another in the row)
    chains: list[list[int]] = []  # the shared rows each example attends to before its own
    opened: dict[tuple[int, int], int] = {}  # (parent, token) -> row index, for shareable prompt tokens
    shared = False
    for e in examples:
        predicting = _predicting(e, ignore)
        if not predicting:
            continue
        first, end = predicting[0], predicting[-1] + 1
        parent, own, chain = -1, 0, []
        for t in range(end):
            token = e.input_ids[t]
            key = (parent, token)
            if t < first and share_prefixes and key in opened:
                parent, shared = opened[key], True
                chain.append(parent)
                continue
            if t < first and share_prefixes:
                opened[key] = len(ids)
            ids.append(token)
            positions.append(t)
            targets.append(e.labels[t + 1])
            parent = len(ids) - 1
            own += 1
        lengths.append(own)
        chains.append(chain)
    if not ids:
        raise ValueError("no example in the micro-batch has a label to predict")
    batch = {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "next_targets": torch.tensor([targets]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "segment_lengths": torch.tensor(lengths),
    }
    if shared:
        batch["prefix_lengths"] = torch.tensor([len(c) for c in chains])
        batch["prefix_rows"] = torch.tensor([row for c in chains for row in c], dtype=torch.long)
    return batch


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's inputs for a one-row batch: no attention mask (the attention function keeps examples apart)."""
    layout = {k: batch[k] for k in ("segment_lengths", "prefix_lengths", "prefix_rows") if k in batch}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **layout}


def _cache_keyword() -> str:
    """The KV cache's keyword in forward/generate: `cache` from transformers 5.x on, `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def shared_prefill_supported(model: nn.Module) -> bool:
    """Whether `SharedPrefill` serves `model`, one whose one-row layouts passed `padding_free_supported`: a decoder
    whose every layer keeps a plain (not sliding-window) dynamic cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "sliding_window", None):
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


class SharedPrefill:
    """The KV cache of many prompts, computed over their prefix tree: a prefix several prompts open with (the chat
    template's header, a shared instruction) is computed once, as in training's shared-prefix rows. `cache_for`
    hands out a batch's left-padded cache of each prompt but its last token, which generation then computes; the
    greedy answers are those of prefilling each prompt apart (held to that by the tests)."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], device) -> None:
        from transformers import DynamicCache

        if any(len(p) < 2 for p in prompts):
            raise ValueError("every prompt needs 2 tokens or more (the last is left to generation)")
        # a label on each prompt's last token makes every earlier token shareable but the one before it
        batch = collate_flat([Example(p, [-100] * (len(p) - 1) + [p[-1]]) for p in prompts], ignore=-100)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cache = DynamicCache()
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        with torch.no_grad(), segment_attention(base):
            model(**inputs, **{_cache_keyword(): cache}, use_cache=True, logits_to_keep=1)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        own = batch["segment_lengths"].tolist()
        starts = [0, *itertools.accumulate(own)][:-1]
        shared = batch.get("prefix_lengths", torch.zeros(len(own), dtype=torch.long)).tolist()
        chains = (
            batch["prefix_rows"].split(shared)
            if "prefix_rows" in batch
            else [torch.zeros(0, dtype=torch.long)] * len(own)
        )
        self.rows = [
            torch.cat([c, torch.arange(s, s + n)]).to(device) for c, s, n in zip(chains, starts, own, strict=True)
        ]

    def cache_for(self, prompts: list[int], width: int):
        """Keyword arguments for `generate`: the cache of `prompts` (indices into the prompts given at construction),
        each right-aligned in `width` positions, as left-padded input ids of `width + 1` columns need it."""
        from transformers import DynamicCache

        layers = []
        for keys, values in self.layers:
            shape = (len(prompts), keys.shape[1], width, keys.shape[3])
            batch_keys, batch_values = keys.new_zeros(shape), values.new_zeros(shape)
            for row, i in enumerate(prompts):
                rows = self.rows[i]
                batch_keys[row, :, width - len(rows) :] = keys[0, :, rows]
                batch_values[row, :, width - len(rows) :] = values[0, :, rows]
            layers.append((batch_keys, batch_values))
        return {_cache_keyword(): DynamicCache(layers)}
