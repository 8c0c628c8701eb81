"""Cross-entropy through a linear output head, computed a chunk of positions at a time: the (positions x vocabulary)
logits and their gradient never exist whole. For a 49k-token vocabulary they are the largest activation of a small
LLM's step (8 x 2048 positions: 3.2 GB of float32 logits, and as much again for their gradient).

    loss = linear_cross_entropy(hidden, head.weight, targets)     # sum over targets != -100; exact gradients
    handle = enable_chunked_loss(model)                           # a transformers causal LM (or PeftModel): its
    trainer.train()                                               #   forward(labels=...) computes the loss this way
    handle.remove()

The gradients are computed in the forward pass, chunk by chunk (the upstream gradient of a scalar loss only scales
them), and kept: the hidden states' gradient (positions x hidden size) and, when the head trains, its weight's.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20
"""Default float32 logits per chunk: large enough for efficient matmuls, small beside a step's activations."""


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's float32 logits take about `chunk_bytes`."""
    return max(16, chunk_bytes // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        compute = hidden.dtype  # the head's matmul in the activations' dtype (as the model's own head runs), the
        w = weight.to(compute)  # softmax and the loss in float32
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            valid = t != ignore_index
            picked = t.masked_fill(~valid, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            total += ((lse - logits.gather(1, picked).squeeze(1)) * valid).sum()
            if not (want_h or want_w or want_b):
                continue
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
            grad_logits.scatter_add_(1, picked, -torch.ones_like(picked, dtype=grad_logits.dtype))
            grad_logits.mul_(valid.unsqueeze(1))
            if want_b:
                grad_b += grad_logits.sum(0)
            g = grad_logits.to(compute)
            if want_h:
                grad_h[start : start + chunk_size] = g @ w
            if want_w:
                grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dtype=None: None if g is None else (g * grad_out).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w, ctx.dtypes[0]), scale(grad_b, ctx.dtypes[1]), None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, chunk by chunk (see the module doc).

    Args:
        hidden: (..., hidden size) inputs of the head; flattened with `targets` (same leading shape).
        weight: (vocabulary, hidden size), the head's weight; its gradient is computed only if it requires one.
        targets: token ids; `ignore_index` positions add nothing.
        chunk_size: positions per chunk; default: about 32 MiB of float32 logits (`chunk_rows`).
        reduction: "sum" (what the trainer divides by its global token count) or "mean" over counted targets.

    Returns:
        A float32 scalar, equal (to float rounding) to `cross_entropy(hidden @ weight.T + bias, targets)`.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ConfigError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} differ in positions.")
    if reduction not in ("sum", "mean"):
        raise ConfigError(f'reduction={reduction!r}: use "sum" or "mean".')
    rows = chunk_size or chunk_rows(weight.shape[0])
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, ignore_index)
    return total / (targets != ignore_index).sum().clamp(min=1) if reduction == "mean" else total


# -- the model's output head ------------------------------------------------------------------------------------------
def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a transformers model (or of the model a PeftModel wraps) when it is a plain nn.Linear
    whose output the model returns as its logits unchanged (checked on two positions); else None: a wrapped,
    quantized or adapted head, or a model that scales or caps its logits, keeps the full computation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return None
    ids = torch.tensor([[1, 2]], device=head.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            with head_returns_inputs(head):
                hidden = model(input_ids=ids).logits
    except (TypeError, ValueError, RuntimeError):  # a forward that refuses the inputs
        return None
    finally:
        model.train(was_training)
    if hidden.shape[-1] != head.in_features:
        return None
    return head if torch.allclose(head(hidden), logits, rtol=1e-4, atol=1e-4) else None


@contextlib.contextmanager
def head_returns_inputs(head: nn.Linear) -> Iterator[None]:
    """Inside the block `head` returns what it is given: the model's "logits" are the head's inputs, for
    `linear_cross_entropy` to apply the head chunk by chunk."""
    head.forward = types.MethodType(lambda self, x: x, head)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


# -- transformers models ----------------------------------------------------------------------------------------------
@dataclass
class ChunkedLossHandle:
    """What `enable_chunked_loss` changed; `remove()` restores the model."""

    model: nn.Module
    head: nn.Linear

    def remove(self) -> None:
        self.model.__dict__.pop("forward", None)  # the class's forward again


def enable_chunked_loss(model: nn.Module, chunk_size: int | None = None) -> ChunkedLossHandle:
    """Make a transformers causal LM (or the model inside a PeftModel) compute `forward(labels=...)`'s loss with
    `linear_cross_entropy` while gradients are on: transformers' shift, `ignore_index` and `num_items_in_batch`
    (what `Trainer` passes for gradient accumulation) are honoured, and `outputs.logits` is None in such a call (the
    point is never to build them). Calls without labels or without gradients (evaluation, generation) are unchanged.

    Raises:
        ConfigError: the model's output head is not a plain linear layer whose output are the logits (a wrapped or
            quantized head, or a model that scales or caps its logits).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = plain_output_head(base)
    if head is None:
        raise ConfigError(
            f"{type(base).__name__}'s output head is not a plain nn.Linear whose outputs are the logits (it is "
            f"adapted, quantized, or the model scales or caps its logits): the chunked loss does not apply; train "
            f"without it."
        )
    forward = base.forward  # the bound class forward
    rows = chunk_size

    def chunked_forward(self: nn.Module, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        if labels is None or not torch.is_grad_enabled():
            return forward(*args, labels=labels, **kwargs)
        with head_returns_inputs(head):
            outputs = forward(*args, **kwargs)
        hidden, outputs.logits = outputs.logits, None
        outputs.loss = causal_lm_loss(hidden, head, labels, kwargs.get("num_items_in_batch"), rows)
        return outputs

    base.forward = types.MethodType(chunked_forward, base)
    return ChunkedLossHandle(base, head)


def causal_lm_loss(
    hidden: Tensor, head: nn.Linear, labels: Tensor, num_items_in_batch: Any = None, chunk_size: int | None = None
) -> Tensor:
    """transformers' causal-LM loss (position t predicts label t + 1; mean over counted labels, or sum divided by
    `num_items_in_batch`) through `linear_cross_entropy`."""
    labels = labels.to(hidden.device)
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if hidden.shape[:-1] != targets.shape:  # e.g. logits_to_keep given with labels: positions do not line up
        raise ConfigError(f"labels {tuple(labels.shape)} do not match the head's inputs {tuple(hidden.shape[:-1])}.")
    total = linear_cross_entropy(hidden, head.weight, targets, head.bias, chunk_size=chunk_size)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
