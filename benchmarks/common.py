"""Shared benchmark helpers: the SmolLM2-shaped model, interleaved timing, saved-activation accounting."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

# SmolLM2-135M's shape (LLaMA architecture); random init keeps the benchmark independent of the download.
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)


def smollm2_shaped(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).train()


def step_allocator(model: nn.Module) -> Callable[[], None]:
    """Calls the model's per-step hook with a running step count (AdaLoRA's allocation: deltatune has it on the
    PeftModel, a no-op for other methods; peft on its AdaLoRA tuner only)."""
    allocate = getattr(model, "update_and_allocate", None) or getattr(model.base_model, "update_and_allocate", None)
    steps = iter(range(10**9))

    def run() -> None:
        if allocate is not None:
            allocate(next(steps))

    return run


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each fn once per round, in turn, so machine noise hits every variant alike; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def saved_activation_bytes(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward during `step()` (which returns a loss)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())
