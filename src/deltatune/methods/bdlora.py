"""BD-LoRA, block-diagonal LoRA (peft's `use_bdlora`), as a LoRA variant: on chosen targets A or B is block-diagonal
with `nblocks` blocks, so a server that shards the base layer over `nblocks` devices applies each block locally
(column-sharded layers, e.g. q/k/v and up/gate: block-diagonal B; row-sharded ones, e.g. o and down: block-diagonal
A) and LoRA adds no communication.

    ΔW = s · B A, with A = blockdiag(A_1, ..., A_n) (each (r/n, d_in/n)) or B = blockdiag(B_1, ..., B_n)
    trainable params per block-diagonal factor: its size / n

Files are peft's: the block-diagonal factor is saved as its stacked blocks, `lora_A.weight` (r, d_in/n) or
`lora_B.weight` (d_out, r/n). Targets are matched by substring of the module path (peft's rule); with
`match_strict` every target must match one of the two lists. Linear layers (and GPT-2 Conv1D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, UnsupportedModuleError
from deltatune.functional.lora import lora_delta
from deltatune.methods.lora_layer import LoraLinear, _LoraLayer, register_lora_variant


@dataclass
class BdLoraConfig:
    """BD-LoRA's settings (peft's `BdLoraConfig` fields and defaults)."""

    target_modules_bd_a: list[str] | None = None
    """Targets (substrings of the module path) whose A is block-diagonal: row-sharded layers (o_proj, down_proj)."""
    target_modules_bd_b: list[str] | None = None
    """Targets whose B is block-diagonal: column-sharded layers (q/k/v, up/gate)."""
    nblocks: int = 1
    """Blocks per block-diagonal factor: the serving shard count."""
    match_strict: bool = True
    """Every target must match one of the two lists (False: the others are plain LoRA)."""

    def __post_init__(self) -> None:
        if not isinstance(self.nblocks, int) or isinstance(self.nblocks, bool) or self.nblocks <= 0:
            raise ConfigError(f"use_bdlora.nblocks must be a positive integer, got {self.nblocks!r}.")
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ConfigError(
                f"use_bdlora names {sorted(overlap)} in both target_modules_bd_a and target_modules_bd_b; a factor "
                "is block-diagonal on A or on B, choose one."
            )


def block_diagonal(blocks: Tensor, nblocks: int) -> Tensor:
    """The dense (rows, nblocks * cols) matrix of `blocks` (rows, cols) cut into `nblocks` row groups placed on the
    diagonal, zeros elsewhere."""
    return torch.block_diag(*blocks.chunk(nblocks, dim=0))


class BlockDiagonalLinear(nn.Module):
    """y = x Wᵀ for W = block_diagonal(weight, nblocks); `weight` (out, in / nblocks) holds only the blocks."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, zero: bool, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device))
        self.register_parameter("bias", None)  # a LoRA factor's bias slot (lora_bias), always empty here
        if zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)  # peft's init of a block-diagonal A

    def forward(self, x: Tensor) -> Tensor:
        n = self.nblocks
        blocks = self.weight.view(n, self.out_features // n, self.in_features // n)
        grouped = x.reshape(-1, n, self.in_features // n).transpose(0, 1)  # (n, tokens, in/n)
        out = torch.bmm(grouped, blocks.transpose(1, 2)).transpose(0, 1)  # (tokens, n, out/n)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> Tensor:
        return block_diagonal(self.weight, self.nblocks)


class BdLoraVariant:
    """BD-LoRA on LoRA's linear wrapper: at init, A or B becomes a `BlockDiagonalLinear` as the target's name says."""

    param_name = None  # no tensor of its own: it reshapes A or B

    def init(self, layer: _LoraLayer, name: str, options: dict[str, Any]) -> None:
        path, n = options["target_name"], options["nblocks"]
        on_a = any(p in path for p in options["target_modules_bd_a"] or [])
        on_b = any(p in path for p in options["target_modules_bd_b"] or [])
        if on_a and on_b:
            raise ConfigError(f"use_bdlora: {path} matches both target_modules_bd_a and target_modules_bd_b.")
        if not (on_a or on_b):
            if options["match_strict"]:
                raise ConfigError(
                    f"use_bdlora: target {path} matches neither target_modules_bd_a nor target_modules_bd_b; add it "
                    "to one, or set match_strict=False to keep it plain LoRA."
                )
            return
        r, device = layer.r[name], layer.lora_A[name].weight.device
        d_in, d_out = (layer.in_features, r) if on_a else (r, layer.out_features)
        if d_in % n or d_out % n:
            raise UnsupportedModuleError(
                f"use_bdlora: {path}'s block-diagonal {'A' if on_a else 'B'} is ({d_out}, {d_in}), not divisible into "
                f"nblocks={n} blocks; choose r and nblocks that divide the layer's sizes."
            )
        if on_b and layer.lora_B[name].bias is not None:
            raise UnsupportedModuleError(f"use_bdlora: {path} has lora_bias, which a block-diagonal B does not carry.")
        factor = BlockDiagonalLinear(d_in, d_out, n, zero=on_b, device=device)
        if on_a:
            layer.lora_A[name] = factor
        else:
            layer.lora_B[name] = factor

    def delta_weight(self, layer: _LoraLayer, name: str) -> Tensor:
        a, b = (_dense(f).float() for f in (layer.lora_A[name], layer.lora_B[name]))
        return lora_delta(a, b, layer.scaling[name], layer.fan_in_fan_out)

    def forward(self, layer: LoraLinear, name: str, x: Tensor, result: Tensor) -> Tensor:
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        xd = F.dropout(x, layer.dropout_p[name], layer.training)
        term = lora_b(lora_a(xd.to(lora_a.weight.dtype))) * layer.scaling[name]
        return result + term.to(result.dtype)


def _dense(factor: nn.Module) -> Tensor:
    return factor.dense() if isinstance(factor, BlockDiagonalLinear) else factor.weight


register_lora_variant("use_bdlora", LoraLinear, BdLoraVariant())
