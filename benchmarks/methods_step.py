"""One training step per method on the SmolLM2-135M shape, deltatune vs peft, interleaved in one process.

Batch 4 x 128, q,k,v,o, rank 8 (VeRA r=256, its usual setting; AdaLoRA init_r 12 -> target 8, with its
allocation step), fwd + bwd + AdamW, dropout 0. Reports step time
relative to deltatune's LoRA and to peft's implementation of the same method, and the bytes autograd saves for
backward. Writes results/methods_step.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    distinct,
    interleaved,
    median,
    provenance,
    saved_activation_bytes,
    smollm2_shaped,
    spread,
    step_allocator,
    verdict,
    write_results,
)

import deltatune as dt  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = {
    "LoRA": ("LoraConfig", dict(r=8, lora_alpha=16)),
    "DoRA": ("LoraConfig", dict(r=8, lora_alpha=16, use_dora=True)),
    "GraLoRA": ("GraloraConfig", dict(r=8, alpha=16, gralora_k=2)),
    "VeRA": ("VeraConfig", dict(r=256)),
    # budget phase throughout (total_step far away): importance update + masking + orthogonal penalty every step
    "AdaLoRA": ("AdaLoraConfig", dict(init_r=12, target_r=8, lora_alpha=16, total_step=1000, task_type="CAUSAL_LM")),
    # its own default targets (keys, values, the FFN's second linear scaled at its input)
    "IA3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "LNTuning": ("LNTuningConfig", dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])),
    # deltatune only (peft has none): Pfeiffer placement after the FFN, rf 16
    "Bottleneck": ("BottleneckConfig", dict(target_modules=None, adapter_type="pfeiffer")),
    # deltatune only: partial fine-tuning, the weights of the top 2 blocks (SmolLM2 has no biases for BitFit)
    "Partial": ("SelectiveConfig", dict(target_modules=[], train_parameters=["weight"], top_k_layers=2)),
}


def build(lib, method: str):
    cls, kwargs = METHODS[method]
    if not hasattr(lib, cls):
        return None  # the library has no such method
    kwargs = {"target_modules": TARGETS, **kwargs}
    model = lib.get_peft_model(smollm2_shaped(), getattr(lib, cls)(**kwargs)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))

    def loss():
        return model(input_ids=ids, labels=ids).loss

    allocate = step_allocator(model)

    def step():
        loss().backward()
        opt.step()
        allocate()
        opt.zero_grad(set_to_none=True)

    return model, loss, step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (LoRA is always in)")
    args = parser.parse_args()
    chosen = ["LoRA", *[m for m in args.methods.split(",") if m in METHODS and m != "LoRA"]]
    libs = {"deltatune": dt}
    try:
        import peft

        libs["peft"] = peft
    except ImportError:
        pass
    built = {f"{m} ({name})": build(lib, m) for m in chosen for name, lib in libs.items()}
    variants = {k: v for k, v in built.items() if v is not None}
    saved = {k: saved_activation_bytes(m, loss) for k, (m, loss, _) in variants.items()}
    for m, _, _ in variants.values():
        m.zero_grad(set_to_none=True)
    times = interleaved({k: step for k, (_, _, step) in variants.items()}, rounds=args.rounds)
    step_s = {k: median(v) for k, v in times.items()}
    base = step_s["LoRA (deltatune)"]
    lines = [
        "# One training step per method: SmolLM2-135M shape, batch 4 x 128, q,k,v,o (IA3: k,v,down; LN tuning: "
        "all norms; Bottleneck: Pfeiffer after the FFN, rf 16)",
        "",
        *provenance(args.rounds, "one step per variant per round, all variants interleaved in one process"),
        '- a difference to peft is called one only when the two ranges do not overlap; otherwise "same"',
        "",
        "| method (implementation) | step (s), median (min-max) | vs deltatune LoRA | vs peft, same method | "
        "saved act. (MiB) |",
        "|---|---|---|---|---|",
    ]
    for key, value in step_s.items():
        method = key.split(" (")[0]
        theirs_key = f"{method} (peft)"
        vs_peft = "n/a"
        if theirs_key in step_s and theirs_key != key:
            same = "" if distinct(times[key], times[theirs_key]) else " (same: ranges overlap)"
            vs_peft = f"{value / step_s[theirs_key]:.3f}x{same}"
        lines.append(f"| {key} | {spread(times[key])} | {value / base:.3f}x | {vs_peft} | {saved[key] / 2**20:.1f} |")
    for method in ("DoRA", "AdaLoRA"):
        if f"{method} (peft)" in step_s:
            ours = step_s[f"{method} (deltatune)"] / step_s["LoRA (deltatune)"]
            theirs = step_s[f"{method} (peft)"] / step_s["LoRA (peft)"]
            lines += [
                "",
                f"{method} overhead over LoRA: deltatune {ours:.3f}x, peft {theirs:.3f}x "
                f"(target: ours <= peft's): {verdict(ours <= theirs)}.",
            ]
    if "IA3 (peft)" in step_s:
        ours, theirs = times["IA3 (deltatune)"], times["IA3 (peft)"]
        met = median(ours) <= median(theirs) or not distinct(ours, theirs)
        lines += [
            "",
            f"IA3 step vs peft's: {median(ours) / median(theirs):.3f}x (target: at or below): {verdict(met)}.",
        ]
    name = "methods_step" if len(chosen) == len(METHODS) else "methods_step_" + "_".join(m.lower() for m in chosen)
    write_results(name, lines, {"step_s": times, "saved_bytes": saved, "rounds": args.rounds})


if __name__ == "__main__":
    main()
