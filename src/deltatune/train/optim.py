"""Optimizer parameter groups (LoRA+) and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

B_NAMES = ("lora_B", "lora_embedding_B")


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    weight_decay: float = 0.0,
    loraplus_lr_embedding: float | None = None,
) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B matrices (and 1-D trainables such as biases) learn at
    lr * loraplus_lr_ratio, the rest at lr; an embedding's A at `loraplus_lr_embedding` when given."""
    groups: dict[str, list[nn.Parameter]] = {"a": [], "b": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(f".{b}." in name or name.endswith(f".{b}") for b in B_NAMES) or param.dim() == 1:
            groups["b"].append(param)
        elif "lora_embedding_A" in name and loraplus_lr_embedding is not None:
            groups["embedding"].append(param)
        else:
            groups["a"].append(param)
    out = [
        {"params": groups["a"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["b"], "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": loraplus_lr_embedding or lr, "weight_decay": weight_decay},
    ]
    return [g for g in out if g["params"]]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float | None = None,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters with LoRA+ groups (peft's function name and arguments)."""
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None
) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only (with LoRA+ groups when a ratio is given)."""
    if loraplus_lr_ratio:
        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr, loraplus_lr_ratio, loraplus_weight_decay=weight_decay
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then linear / cosine decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))
