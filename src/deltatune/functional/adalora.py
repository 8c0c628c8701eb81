"""AdaLoRA math (Zhang et al. 2023, arXiv:2303.10512): an SVD-shaped update whose rank budget shrinks during training.

ΔW = s · P Λ Q           P = B (d_out, r), Λ = diag(E) (r,), Q = A (r, d_in); s = lora_alpha / (init_r + 1e-5)
R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F                         (eq. 4, averaged over matrices as peft does)
I(w) = |w · ∂L/∂w|;  Ī ← β1 Ī + (1−β1) I;  Ū ← β2 Ū + (1−β2) |I − Ī|;  S(w) = Ī · Ū    (eqs. 8-10)
S(triplet i) = S(E_i) + mean_j S(A_ij) + mean_k S(B_ki)                                   (eq. 7)
budget b(t): init until t_init, cubic decay to the target until T − t_final, then the target (eq. 11 / App. A)
"""

from __future__ import annotations

import torch
from torch import Tensor


def svd_scale(lora_alpha: float, ranknum: float) -> float:
    """peft's AdaLoRA scale: lora_alpha / (ranknum + 1e-5), ranknum being the initial rank, so pruning a triplet
    never rescales the others."""
    return float(lora_alpha) / (float(ranknum) + 1e-5)


def svd_delta(lora_a: Tensor, lora_e: Tensor, lora_b: Tensor, scale: float, fan_in_fan_out: bool = False) -> Tensor:
    """ΔW = s · B diag(E) A as (d_out, d_in) (transposed when `fan_in_fan_out`); A (r, d_in), E (r, 1), B (d_out, r)."""
    delta = scale * (lora_b @ (lora_a * lora_e))
    return delta.T if fan_in_fan_out else delta


def orthogonality_penalty(lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """‖A Aᵀ − I‖_F + ‖BᵀB − I‖_F: pushes the rows of A and the columns of B towards orthonormal sets. Also takes
    stacks (n, r, d_in) / (n, d_out, r) and returns the n sums."""
    eye = torch.eye(lora_a.shape[-2], device=lora_a.device, dtype=lora_a.dtype)
    gram_a, gram_b = lora_a @ lora_a.mT, lora_b.mT @ lora_b
    return torch.linalg.matrix_norm(gram_a - eye) + torch.linalg.matrix_norm(gram_b - eye)


@torch.no_grad()
def update_importance(
    params: list[Tensor], grads: list[Tensor], ema_ipt: list[Tensor], ema_unc: list[Tensor], beta1: float, beta2: float
) -> None:
    """One step of the smoothed sensitivity Ī and its uncertainty Ū for many tensors at once, in place (multi-tensor
    kernels: a handful of launches for the whole model instead of several per tensor)."""
    ipt = torch._foreach_mul(params, grads)
    torch._foreach_abs_(ipt)
    torch._foreach_mul_(ema_ipt, beta1)
    torch._foreach_add_(ema_ipt, ipt, alpha=1 - beta1)
    torch._foreach_sub_(ipt, ema_ipt)  # I − Ī, with the updated Ī
    torch._foreach_abs_(ipt)
    torch._foreach_mul_(ema_unc, beta2)
    torch._foreach_add_(ema_unc, ipt, alpha=1 - beta2)


def triplet_scores(score_a: Tensor, score_e: Tensor, score_b: Tensor) -> Tensor:
    """Per-triplet importance (r,) from element scores S = Ī·Ū of A (r, d_in), E (r, 1) and B (d_out, r)."""
    return score_e.view(-1) + score_a.mean(dim=1) + score_b.mean(dim=0)


def budget_schedule(
    step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int, delta_t: int
) -> tuple[int, bool]:
    """(total rank allowed after `step`, whether to re-mask at this step); steps count from 0 as in peft's loop."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % delta_t == 0


def keep_top(scores: list[Tensor], budget: int) -> list[Tensor]:
    """Boolean keep-masks, one per layer, keeping exactly the `budget` highest-scoring triplets over all layers (ties
    broken by position, so the total is exact even when scores tie, e.g. all zero)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if budget > 0:
        keep[torch.topk(flat, min(budget, flat.numel()), sorted=False).indices] = True
    return list(keep.split([s.numel() for s in scores]))
