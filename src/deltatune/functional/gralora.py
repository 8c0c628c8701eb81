"""GraLoRA math (Jung et al. 2025, arXiv:2505.20355): the weight is split into k x k blocks; block (j, n) (output
block j, input block n) gets its own rank-r/k update, so the whole update has rank up to k·r with LoRA's parameter
count r·(d_in + d_out).

Layout (peft's): A is (k, d_in/k, r) — input block n's down-projection; B is (k, r, d_out/k) — output block j's
up-projection. Block (j, n) pairs sub-rank slice j of A_n with row slice n of B_j:

    ΔW[j-block, n-block]ᵀ = A[n][:, j·r/k:(j+1)·r/k] @ B[j][n·r/k:(n+1)·r/k, :]        (times the scale)
"""

from __future__ import annotations

import torch
from torch import Tensor


def gralora_project(x: Tensor, gralora_a: Tensor, gralora_b: Tensor) -> Tensor:
    """x (..., d_in) -> (..., d_out) through the k x k block structure, without building ΔW."""
    k, _, r = gralora_a.shape
    sub = r // k
    lead = x.shape[:-1]
    blocks = x.reshape(-1, k, x.shape[-1] // k)  # (tokens, n, d_in/k)
    # einsum contracts per block as one batched matmul over n with all tokens as rows; a broadcast `@` would expand
    # the weights to every token (memory and time x tokens)
    h = torch.einsum("tni,nir->tnr", blocks, gralora_a)  # h[t, n, j·sub + s]
    h = h.reshape(-1, k, k, sub).transpose(1, 2).reshape(-1, k, r)  # (tokens, j, n·sub + s)
    out = torch.einsum("tjr,jro->tjo", h, gralora_b)  # (tokens, j, d_out/k)
    return out.reshape(*lead, -1)


def gralora_delta(gralora_a: Tensor, gralora_b: Tensor, scale: float) -> Tensor:
    """ΔW as (d_out, d_in): block (j, n) is (A[n][:, slice j] @ B[j][slice n, :])ᵀ, times `scale`."""
    k, _, r = gralora_a.shape
    sub = r // k
    rows = [
        torch.cat(
            [(gralora_a[n][:, j * sub : (j + 1) * sub] @ gralora_b[j][n * sub : (n + 1) * sub, :]).T for n in range(k)],
            dim=1,
        )
        for j in range(k)
    ]
    return scale * torch.cat(rows, dim=0)
