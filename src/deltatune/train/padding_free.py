"""Padding-free micro-batches: a micro-batch's examples laid end to end in one row, each attending only to itself.

Right-padding a batch to its longest example wastes every padded position in every matmul (10-12% of the
quickstart's FLOPs). Here the examples are concatenated instead, positions restart at each example (`position_ids`),
and attention runs per example (`segment_lengths`, a causal SDPA call per example), so the loss is that of the
padded batch, without the padding. transformers routes attention through `AttentionInterface`: while a run trains,
the model's `_attn_implementation` names this module's function, which does the per-example attention when it is
given `segment_lengths` and is transformers' SDPA otherwise. A model is used this way only after a probe showed its
packed logits equal the per-example ones (`padding_free_supported`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

SEGMENTS = "deltatune_segments"
_registered = False


def _segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = kwargs.pop("segment_lengths", None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    lengths = lengths.tolist() if isinstance(lengths, Tensor) else list(lengths)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    parts = [
        nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


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
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = SEGMENTS
    try:
        yield
    finally:
        config._attn_implementation = before


def padding_free_supported(model: nn.Module) -> bool:
    """Whether `model` (a transformers model, or a PeftModel around one) computes a packed row with per-example
    attention exactly as it computes the examples one by one: checked on two short random rows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") or not _register():
        return False
    embeddings = base.get_input_embeddings()
    vocab = getattr(embeddings, "base_layer", embeddings).num_embeddings  # the table itself, when a method wraps it
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (1, n), generator=g) for n in (5, 3)]
    device = next(base.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=r.to(device)).logits for r in rows]
            with segment_attention(base):
                packed = model(
                    input_ids=torch.cat(rows, 1).to(device),
                    position_ids=torch.cat([torch.arange(r.shape[1]) for r in rows])[None].to(device),
                    segment_lengths=[r.shape[1] for r in rows],
                ).logits
    except (TypeError, ValueError, RuntimeError):  # a forward that refuses the inputs
        return False
    finally:
        model.train(was_training)
    return packed.shape[1] == 8 and torch.allclose(packed, torch.cat(alone, 1), rtol=1e-4, atol=1e-4)


def collate_flat(examples, ignore: int) -> dict[str, Tensor]:
    """One row of the examples end to end: input_ids, labels (each example's first label ignored: in a padded row
    nothing predicts it either), position_ids restarting per example, attention_mask and segment_lengths."""
    ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)
    labels = torch.tensor([ignore if i == 0 else t for e in examples for i, t in enumerate(e.labels)]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(e.input_ids)) for e in examples]).unsqueeze(0)
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": torch.ones_like(ids),
        "segment_lengths": lengths,
    }
