"""Optimizer parameter groups (LoRA+) and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError


def _param_roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> role, as adapter layers declare them (`AdapterLayer.param_roles`)."""
    roles: dict[int, str] = {}
    for module in model.modules():
        for attr, role in getattr(module, "param_roles", {}).items():
            container = getattr(module, attr, None)
            if isinstance(container, nn.Module):
                roles.update({id(p): role for p in container.parameters()})
    return roles


def adapter_param_groups(
    model: nn.Module, lr: float | dict[str, float], weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """One optimizer parameter group per adapter (`"adapter"` names it), for training several adapters at once, e.g.
    two tasks in one run (`set_adapter([...])`, or per-row `adapter_names=` batches): `lr` is one rate or one per
    adapter. Only trainable parameters are included."""
    groups = []
    for name in model.peft_config:
        params, seen = [], set()
        for _, wrapper in model._wrappers():
            for p in wrapper.adapter_parameters(name):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        rate = lr.get(name) if isinstance(lr, dict) else lr
        if params and rate is None:
            raise ConfigError(f"no learning rate for adapter {name!r}; lr has {sorted(lr)}.")
        if params:
            groups.append({"params": params, "lr": rate, "weight_decay": weight_decay, "adapter": name})
    if not groups:
        raise ConfigError("no adapter has trainable parameters; set_adapter([...]) the ones to train.")
    return groups


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    weight_decay: float = 0.0,
    loraplus_lr_embedding: float | None = None,
) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the "up" factors (B in B·A, whatever a method calls them)
    and 1-D trainables such as biases or magnitudes learn at lr * loraplus_lr_ratio, the rest at lr; an embedding's
    input-side factor at `loraplus_lr_embedding` when given."""
    roles = _param_roles(model)
    groups: dict[str, list[nn.Parameter]] = {"a": [], "b": [], "embedding": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        role = roles.get(id(param))
        if role == "up" or param.dim() == 1:
            groups["b"].append(param)
        elif role == "embedding" and loraplus_lr_embedding is not None:
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


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for a config name; the paged ones need bitsandbytes and CUDA."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw_offload":
        return OffloadedAdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"optimizer {name} needs bitsandbytes (pip install 'deltatune[quant]') and CUDA; on CPU "
            f"use adamw or adamw_offload."
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError(
            f"optimizer {name} pages optimizer state between GPU and CPU and needs CUDA; on CPU use "
            f"adamw (the state already lives in CPU memory)."
        )
    return bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None, name: str = "adamw"
) -> torch.optim.Optimizer:
    """The optimizer over trainable parameters only (with LoRA+ groups when a ratio is given)."""
    cls = optimizer_class(name)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if cls is torch.optim.AdamW and fused_adamw_applies(params) else {}
    if loraplus_lr_ratio:
        return create_loraplus_optimizer(model, cls, lr, loraplus_lr_ratio, loraplus_weight_decay=weight_decay, **fused)
    return cls(params, lr=lr, weight_decay=weight_decay, **fused)


def fused_adamw_applies(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused AdamW kernel can step `params`: plain floating tensors on CPU or CUDA. One kernel per
    step instead of ~10 small ops per parameter (a LoRA has hundreds of small parameters: 9.8 -> 2.8 ms per step for
    SmolLM2's q,k,v,o on a 2-core CPU); the same update to float rounding."""
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in CPU memory: each step copies gradients to fp32 CPU masters (pinned on CUDA), steps
    torch's AdamW there, and copies the result back. Device memory holds only the parameters and their grads.

    The parameters stay the truth: a parameter changed outside `step` since this optimizer last wrote it (a resumed
    checkpoint loaded into the model, a method's hook masking values) is re-read into its master before the update,
    detected by the tensor's in-place version counter.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **kwargs))
        pin = torch.cuda.is_available()
        self.masters = [
            [p.detach().to("cpu", torch.float32, copy=True) for p in g["params"]] for g in self.param_groups
        ]
        if pin:
            self.masters = [[m.pin_memory() for m in group] for group in self.masters]
        self._written = [[p._version for p in g["params"]] for g in self.param_groups]
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": m}
            for g, m in zip(self.param_groups, self.masters, strict=True)
        ]
        masters = [m for group in self.masters for m in group]
        self.inner = torch.optim.AdamW(groups, fused=fused_adamw_applies(masters) or None)
        self.state = self.inner.state  # the moments, on CPU

    @torch.no_grad()
    def step(self, closure=None):
        pairs = list(zip(self.param_groups, self.masters, self.inner.param_groups, self._written, strict=True))
        for group, masters, inner_group, written in pairs:
            inner_group["lr"] = group["lr"]  # schedulers change the outer groups
            for i, (p, m) in enumerate(zip(group["params"], masters, strict=True)):
                if p._version != written[i]:  # changed outside this optimizer since its last write
                    m.copy_(p.detach())
                m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for group, masters, _, written in pairs:
            for i, (p, m) in enumerate(zip(group["params"], masters, strict=True)):
                if m.grad is not None:
                    p.copy_(m.to(p.device, p.dtype, non_blocking=True))
                written[i] = p._version

    def state_dict(self) -> dict[str, Any]:
        """The moments, with the outer groups' current hyperparameters (a scheduler changes those, not the inner's)."""
        for group, inner_group in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner_group.update({k: v for k, v in group.items() if k != "params"})
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the moments and the groups' hyperparameters (the lr a scheduler had set); the masters are re-read from
        the parameters (which a resume restores first)."""
        self.inner.load_state_dict(state_dict)
        self.state = self.inner.state
        with torch.no_grad():
            for group, inner_group, masters in zip(
                self.param_groups, self.inner.param_groups, self.masters, strict=True
            ):
                group.update({k: v for k, v in inner_group.items() if k != "params"})
                for p, m in zip(group["params"], masters, strict=True):
                    m.copy_(p.detach())


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
