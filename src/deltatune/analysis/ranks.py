"""Gradient-sensitivity rank allocation: one-shot, before training, give important layers more LoRA rank.

    score(W) = mean |W ⊙ ∂L/∂W| over a few batches        (first-order Taylor estimate of the loss change if W were
                                                            removed; Molchanov et al. 2019, used by AdaLoRA as
                                                            "sensitivity")
    r_W ∝ score(W), subject to Σ r_W · (d_in + d_out) = the budget of uniform rank r (same parameter count)

Unlike AdaLoRA, which re-allocates during training through an SVD-form adapter, pruning and a schedule, this
runs once on the frozen base, returns a plain `rank_pattern`, and the adapter is ordinary LoRA (any tool loads it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.inject import find_targets


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    d0, d1 = module.weight.shape  # GPT-2 Conv1D stores (d_in, d_out)
    return d0, d1


def sensitivity_scores(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    target_modules: Sequence[str] | str,
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
) -> dict[str, float]:
    """Mean |W ⊙ ∂L/∂W| per targeted module, accumulated over `batches` (the model is left as it was)."""
    from transformers.pytorch_utils import Conv1D

    types = {n: type(m) for n, m in model.named_modules()}
    names = find_targets(types, target_modules=target_modules, supported=(nn.Linear, Conv1D))
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    scores = dict.fromkeys(names, 0.0)
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    try:
        for batch in batches:
            loss_fn(model, batch).backward()
            for n, w in weights.items():
                scores[n] += (w.detach() * w.grad).abs().mean().item()
                w.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return scores


def allocate_ranks(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    target_modules: Sequence[str] | str,
    r: int = 8,
    r_min: int = 1,
    r_max: int | None = None,
    power: float = 0.5,
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
) -> dict[str, int]:
    """A `rank_pattern` (module path -> rank) with the parameter count of uniform rank `r` on the same targets,
    ranks proportional to sensitivity**power (0.5 by default: sensitivities span orders of magnitude, and a milder
    allocation keeps every layer adaptable), clamped to [r_min, r_max] (default 4·r)."""
    if r_min < 1 or r < r_min:
        raise ConfigError(f"need 1 <= r_min <= r, got r_min={r_min}, r={r}.")
    scores = {n: s**power for n, s in sensitivity_scores(model, batches, target_modules, loss_fn).items()}
    costs = {n: sum(_weight_shape(model.get_submodule(n))) for n in scores}
    return _allocate(scores, costs, r, r_min, r_max or 4 * r)


def _allocate(scores: dict[str, float], costs: dict[str, int], r: int, r_min: int, r_max: int) -> dict[str, int]:
    """Integer ranks ∝ score with Σ rank·cost <= r·Σ cost, as close to it as single-rank steps allow."""
    budget = r * sum(costs.values())
    total = sum(scores[n] * costs[n] for n in scores) or 1.0
    ranks = {n: min(r_max, max(r_min, round(budget * scores[n] / total))) for n in scores}
    order = sorted(scores, key=lambda n: scores[n], reverse=True)

    def spent() -> int:
        return sum(ranks[n] * costs[n] for n in ranks)

    for n in reversed(order):  # over budget: take rank from the least sensitive first
        while spent() > budget and ranks[n] > r_min:
            ranks[n] -= 1
    changed = True
    while changed:  # rank left over: give it to the most sensitive that still fit
        changed = False
        for n in order:
            if ranks[n] < r_max and spent() + costs[n] <= budget:
                ranks[n] += 1
                changed = True
    return {re.escape(n): v for n, v in ranks.items()}
