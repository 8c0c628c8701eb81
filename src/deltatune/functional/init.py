"""Initialisations of adapter weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


@torch.no_grad()
def kaiming_a_zero_b(lora_a: Tensor, lora_b: Tensor) -> None:
    """LoRA's default: A ~ kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(fan_in), as nn.Linear), B = 0: ΔW = 0 at start."""
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    nn.init.zeros_(lora_b)


@torch.no_grad()
def gaussian_a_zero_b(lora_a: Tensor, lora_b: Tensor, r: int) -> None:
    """peft's "gaussian" init: A ~ N(0, 1/r), B = 0."""
    nn.init.normal_(lora_a, std=1.0 / r)
    nn.init.zeros_(lora_b)
