"""Profile one LoRA training step on CUDA, deltatune vs peft (SmolLM2 shape, bf16 autocast): the CUDA kernels that
differ most in total time. Diagnostic for benchmarks/gpu_step.py; prints a table. GPU_BATCH / GPU_SEQ as there."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import smollm2_shaped  # noqa: E402
from gpu_step import _step_fn  # noqa: E402
from methods_step import TARGETS  # noqa: E402

import deltatune as dt  # noqa: E402


def kernel_times(step) -> Counter:
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
    out: Counter = Counter()
    for evt in prof.key_averages():
        if evt.device_time_total > 0:
            out[evt.key[:90]] += evt.device_time_total / 3
    return out


def main() -> None:
    import peft

    ours = dt.get_peft_model(smollm2_shaped().cuda(), dt.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16))
    theirs = peft.get_peft_model(smollm2_shaped().cuda(), peft.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16))
    a, b = kernel_times(_step_fn(ours.train())), kernel_times(_step_fn(theirs.train()))
    print(f"total CUDA time per step: deltatune {sum(a.values()) / 1e3:.1f} ms, peft {sum(b.values()) / 1e3:.1f} ms")
    keys = sorted(set(a) | set(b), key=lambda k: -abs(a[k] - b[k]))[:25]
    print("| kernel | deltatune (us) | peft (us) |\n|---|---|---|")
    for k in keys:
        print(f"| {k} | {a[k]:.0f} | {b[k]:.0f} |")


if __name__ == "__main__":
    main()
