"""One training step per method on the SmolLM2-135M shape, deltatune vs peft, interleaved in one process.

Batch 4 x 128, q,k,v,o, rank 8 (VeRA r=256, its usual setting; AdaLoRA init_r 12 -> target 8, with its
allocation step), fwd + bwd + AdamW, dropout 0. Reports step time
relative to deltatune's LoRA and to peft's implementation of the same method, and the bytes autograd saves for
backward. Writes results/methods_step.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, saved_activation_bytes, smollm2_shaped, step_allocator  # noqa: E402

import deltatune as dt  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = {
    "LoRA": ("LoraConfig", dict(r=8, lora_alpha=16)),
    "DoRA": ("LoraConfig", dict(r=8, lora_alpha=16, use_dora=True)),
    "GraLoRA": ("GraloraConfig", dict(r=8, alpha=16, gralora_k=2)),
    "VeRA": ("VeraConfig", dict(r=256)),
    # budget phase throughout (total_step far away): importance update + masking + orthogonal penalty every step
    "AdaLoRA": ("AdaLoraConfig", dict(init_r=12, target_r=8, lora_alpha=16, total_step=1000, task_type="CAUSAL_LM")),
}


def build(lib, method: str):
    cls, kwargs = METHODS[method]
    model = lib.get_peft_model(smollm2_shaped(), getattr(lib, cls)(target_modules=TARGETS, **kwargs)).train()
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
    libs = {"deltatune": dt}
    try:
        import peft

        libs["peft"] = peft
    except ImportError:
        pass
    variants = {f"{m} ({name})": build(lib, m) for m in METHODS for name, lib in libs.items()}
    saved = {k: saved_activation_bytes(m, loss) for k, (m, loss, _) in variants.items()}
    for m, _, _ in variants.values():
        m.zero_grad(set_to_none=True)
    times = interleaved({k: step for k, (_, _, step) in variants.items()}, rounds=5)
    step_s = {k: median(v) for k, v in times.items()}
    base = step_s["LoRA (deltatune)"]
    lines = [
        "# One training step per method: SmolLM2-135M shape, batch 4 x 128, q,k,v,o",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of 5 interleaved rounds.",
        "",
        "| method (implementation) | step (s) | vs deltatune LoRA | vs peft, same method | saved act. (MiB) |",
        "|---|---|---|---|---|",
    ]
    for key, value in step_s.items():
        method = key.split(" (")[0]
        theirs = step_s.get(f"{method} (peft)")
        vs_peft = f"{value / theirs:.3f}x" if theirs else "n/a"
        lines.append(f"| {key} | {value:.3f} | {value / base:.3f}x | {vs_peft} | {saved[key] / 2**20:.1f} |")
    if "DoRA (peft)" in step_s:
        ours = step_s["DoRA (deltatune)"] / step_s["LoRA (deltatune)"]
        theirs = step_s["DoRA (peft)"] / step_s["LoRA (peft)"]
        lines += ["", f"DoRA overhead over LoRA: deltatune {ours:.3f}x, peft {theirs:.3f}x (target: ours <= peft's)."]
    if "AdaLoRA (peft)" in step_s:
        ours = step_s["AdaLoRA (deltatune)"] / step_s["LoRA (deltatune)"]
        theirs = step_s["AdaLoRA (peft)"] / step_s["LoRA (peft)"]
        lines += [
            "",
            f"AdaLoRA overhead over LoRA (allocation + penalty included): deltatune {ours:.3f}x, peft {theirs:.3f}x.",
        ]
    lines.append("")
    out = Path(__file__).parent / "results" / "methods_step.md"
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"step_s": step_s, "saved_bytes": saved}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
