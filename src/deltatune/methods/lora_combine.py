"""`add_weighted_adapter`: a new LoRA adapter combining existing ones (peft's signature and combination types).

    cat               A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...]: ΔW = Σ wᵢ ΔWᵢ exactly, rank Σ rᵢ
    svd               the best rank-k approximation (k = svd_rank, default the largest input rank) of Σ wᵢ ΔWᵢ: exact
                      when k reaches the sum's rank
    linear            A = Σ cᵢAᵢ, B = Σ |cᵢ|Bᵢ with cᵢ = sign(wᵢ)·sqrt(|wᵢ|sᵢ) (factors interpolated, as peft; equal
                      ranks): ΔW = Σ wᵢΔWᵢ only for one adapter, cross terms otherwise
    ties, dare_linear, dare_ties, magnitude_prune
                      the merge rule (`functional.merge`) on the As and on the Bs, weights cᵢ (equal ranks)
    *_svd             the merge rule applied to the wᵢΔWᵢ... as full weight changes, then the rank-k SVD

Where deltatune differs from peft, on purpose: every input's own scale (rsLoRA, `rank_pattern` / `alpha_pattern`) is
folded into the factors and the result has scale 1 per module (its config: `lora_alpha` = `r`, per-module ranks
in `rank_pattern` with equal `alpha_pattern`), so the result means what the types promise whatever the inputs'
configs; negative weights keep their sign; DoRA inputs combine through their effective change ΔW = W' − W with the
svd types (the result is plain LoRA) and are refused by the factor types, as is `lora_bias`. A module one of the
adapters saves whole (modules_to_save) is the combination's as that adapter saved it (peft's rule); one that two save is
refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import AdapterError, ConfigError
from deltatune.functional import merge
from deltatune.methods.lora import LoraConfig
from deltatune.methods.lora_layer import LoraLinear
from deltatune.registry import get_method, register_method

FACTOR_TYPES = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _merge_rule(kind: str, density: float | None, sign_method: str, generator: torch.Generator):
    """(tensors, weights) -> merged tensor for a base type ("linear" is the plain weighted sum)."""
    if kind in ("linear", "svd"):
        return lambda tensors, weights: sum(w * t for t, w in zip(tensors, weights, strict=True))
    if kind == "ties":
        return lambda tensors, weights: merge.ties(tensors, weights, density, sign_method)
    if kind == "dare_ties":
        return lambda tensors, weights: merge.dare_ties(tensors, weights, density, sign_method, generator)
    if kind == "dare_linear":
        return lambda tensors, weights: merge.dare_linear(tensors, weights, density, generator)
    return lambda tensors, weights: merge.magnitude_prune(tensors, weights, density)


def _check(model: Any, adapters: list[str], weights: list[float], name: str, kind: str, density: float | None) -> None:
    if kind not in FACTOR_TYPES + SVD_TYPES:
        raise ConfigError(f"combination_type {kind!r} is not one of {', '.join(FACTOR_TYPES + SVD_TYPES)}.")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise AdapterError(f"no adapters named {missing}; this model has {sorted(model.peft_config)}.")
    if name in model.peft_config:
        raise AdapterError(f"adapter {name!r} already exists; pick another name or delete it first.")
    if kind.removesuffix("_svd") in _NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise ConfigError(f"combination_type {kind!r} needs density in (0, 1], got {density!r}.")
    for a in adapters:
        config = model.peft_config[a]
        forms = {"use_dora": "DoRA", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA", "lora_bias": "lora_bias"}
        other_form = next((label for f, label in forms.items() if getattr(config, f, None)), None)
        if kind in FACTOR_TYPES and other_form:
            raise ConfigError(f"adapter {a!r} uses {other_form}: its change is not "
                              f"B·A, so {kind!r} would be wrong; use an svd type (e.g. 'svd'), which combines the "
                              "changes themselves into plain LoRA.")  # fmt: skip


def _saved_module_owners(model: Any, adapters: list[str]) -> dict[str, str]:
    """Path of each module one of `adapters` saves whole (modules_to_save, task heads) -> that adapter: peft's rule,
    the combination takes that adapter's copy (a whole module has no weighted combination); a module two of them
    save is refused."""
    owners, shared = {}, {}
    for path, wrapper in model._wrappers():
        copies = getattr(wrapper, "modules_to_save", None)
        holders = [a for a in adapters if isinstance(copies, nn.ModuleDict) and a in copies]
        if len(holders) > 1:
            shared[path] = holders
        elif holders:
            owners[path] = holders[0]
    if shared:
        raise ConfigError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s). ({', '.join(f'{p}: {names}' for p, names in shared.items())}: a whole "
            "module has no weighted combination; combine adapters that save different modules.)"
        )
    return owners


def _layer_factors(layer: LoraLinear, adapters: list[str], weights: list[float], kind: str, rank: int | None,
                   rule, clamp: float | None, driver: str | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(A, B) of the combined adapter in this layer, scale 1."""
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapter_names]
    if kind in SVD_TYPES:
        deltas = [layer.get_delta_weight(a) for a, _ in present]
        if layer.fan_in_fan_out:
            deltas = [d.T for d in deltas]
        total = rule(deltas, [w for _, w in present])
        return _svd_factors(total, rank or max(layer.r[a] for a, _ in present), clamp, driver)
    if kind == "cat":
        a = torch.cat([w * layer.scaling[n] * layer.lora_A[n].weight.float() for n, w in present], 0)
        return a, torch.cat([layer.lora_B[n].weight.float() for n, _ in present], 1)
    ranks = {layer.r[n] for n, _ in present}
    if len(ranks) > 1:
        raise ConfigError(f"{kind!r} combines factors of equal rank; ranks here are {sorted(ranks)}: use 'cat' or "
                          "an svd type.")  # fmt: skip
    signed = [math.copysign(math.sqrt(abs(w) * layer.scaling[n]), w) for n, w in present]
    a = rule([layer.lora_A[n].weight.float() for n, _ in present], signed)
    b = rule([layer.lora_B[n].weight.float() for n, _ in present], [abs(c) for c in signed])
    return a, b


def _svd_factors(delta: Tensor, rank: int, clamp: float | None, driver: str | None) -> tuple[Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False, driver=driver)
    rank = min(rank, s.numel())
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:  # peft's svd_clamp: clip both factors at a quantile of their values
        limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]).abs(), clamp)
        u, vh = u.clamp(-limit, limit), vh.clamp(-limit, limit)
    return vh.float(), u.float()


def combine_lora(
    model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> None:
    """Add `adapter_name`, the combination of `adapters` with `weights` (see the module doc). `svd_full_matrices` is
    accepted for peft's signature (the factors are the same either way); `seed` fixes DARE's random masks."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check(model, adapters, weights, adapter_name, combination_type, density)
    owners = _saved_module_owners(model, adapters)  # refuses a module two of them save
    rule = _merge_rule(combination_type.removesuffix("_svd"), density, majority_sign_method,
                       torch.Generator().manual_seed(seed))  # fmt: skip
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for path, layer in model.get_base_model().named_modules():
        if not any(a in getattr(layer, "adapter_names", ()) for a in adapters) or not hasattr(layer, "lora_A"):
            continue
        if not isinstance(layer, LoraLinear):
            raise ConfigError(f"{path} is a {type(layer.base_layer).__name__}: weighted combination covers linear "
                              "layers; combine adapters that target linear layers only.")  # fmt: skip
        factors[path] = _layer_factors(layer, adapters, weights, combination_type, svd_rank, rule, svd_clamp,
                                       svd_driver)  # fmt: skip
    first = model.peft_config[adapters[0]]
    ranks = {path: a.shape[0] for path, (a, _) in factors.items()}
    top = max(ranks.values())
    pattern = {path: r for path, r in ranks.items() if r != top}
    saved = list(dict.fromkeys(m for a in adapters for m in model.peft_config[a].modules_to_save or []))
    config = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(factors), lora_dropout=first.lora_dropout,
                        rank_pattern=pattern, alpha_pattern=dict(pattern), task_type=first.task_type,
                        modules_to_save=saved or None,
                        base_model_name_or_path=first.base_model_name_or_path)  # fmt: skip
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for path, owner in owners.items():  # each saved module: its owner's copy
            copies = model.get_base_model().get_submodule(path).modules_to_save
            copies[adapter_name].load_state_dict(copies[owner].state_dict())
        for path, (a, b) in factors.items():
            layer = model.get_base_model().get_submodule(path)
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)


register_method(dataclasses.replace(get_method("LORA"), combine=combine_lora))
