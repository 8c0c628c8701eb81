"""One training step per method on a CUDA GPU: SmolLM2-135M shape, bf16 autocast, batch 8 x 512, q,k,v,o.

deltatune vs peft, interleaved in one process (CUDA-synchronised wall time, median of rounds), plus each step's peak
GPU memory above the resident model. GPU_BATCH / GPU_SEQ change the batch shape, GPU_METHODS picks methods.
QLoRA rows quantize the base with NF4 + double quantization: deltatune's
`quantize_model` (bitsandbytes kernels on CUDA) against peft on transformers' bitsandbytes-loaded model. Needs a GPU;
writes results/gpu_step.md (or $OUT/gpu_step.md when OUT is set).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import distinct, interleaved, median, provenance, smollm2_shaped, spread, step_allocator  # noqa: E402
from methods_step import METHODS, TARGETS  # noqa: E402  (the same methods and settings as on CPU)

import deltatune as dt  # noqa: E402

BATCH, SEQ = int(os.environ.get("GPU_BATCH", 8)), int(os.environ.get("GPU_SEQ", 512))
ONLY = [m for m in os.environ.get("GPU_METHODS", "").split(",") if m]  # e.g. "LoRA,QLoRA"; empty: all


def _step_fn(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    allocate = step_allocator(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        allocate()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return step


def _peak_bytes(step) -> int:
    """Peak GPU memory of one step above what is resident before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - before


def _qlora_variants(libs: dict) -> dict:
    out = {}
    quantized = dt.quantize_model(smollm2_shaped().cuda(), dt.QuantConfig(compute_dtype="bf16"))
    out["QLoRA (deltatune)"] = dt.get_peft_model(quantized, dt.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16))
    if "peft" in libs:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            smollm2_shaped().save_pretrained(tmp)
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            base = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map={"": 0})
        peft = libs["peft"]
        out["QLoRA (peft)"] = peft.get_peft_model(base, peft.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16))
    return out


def main() -> None:
    libs = {"deltatune": dt}
    try:
        import peft

        libs["peft"] = peft
    except ImportError:
        pass
    models = {}
    for method, (cls, kwargs) in METHODS.items():
        if ONLY and method not in ONLY:
            continue
        for name, lib in libs.items():
            config = getattr(lib, cls)(target_modules=TARGETS, **kwargs)
            models[f"{method} ({name})"] = lib.get_peft_model(smollm2_shaped().cuda(), config).train()
    try:
        if not ONLY or "QLoRA" in ONLY:
            models.update(_qlora_variants(libs))
    except Exception as exc:  # bitsandbytes missing or failing: report it, keep the other rows
        print(f"QLoRA rows skipped: {type(exc).__name__}: {exc}")
    steps = {k: _step_fn(m.train()) for k, m in models.items()}
    peak = {k: _peak_bytes(fn) for k, fn in steps.items()}
    times = interleaved(steps, rounds=20, warmup=3)
    step_s = {k: median(v) for k, v in times.items()}
    base = step_s["LoRA (deltatune)"]
    lines = [
        f"# One training step per method on {torch.cuda.get_device_name()}: SmolLM2-135M shape, bf16 autocast, "
        f"batch {BATCH} x {SEQ}, q,k,v,o",
        "",
        *provenance(20, "one step per variant per round after 3 warm-ups, all variants interleaved"),
        "- peak = max allocated during one step above the memory resident before it (after warm-up)",
        "",
        "| method (implementation) | step (ms), median (min-max) | vs deltatune LoRA | vs peft, same method "
        "| step peak (MiB) |",
        "|---|---|---|---|---|",
    ]
    for key, value in step_s.items():
        theirs_key = f"{key.split(' (')[0]} (peft)"
        vs_peft = "n/a"
        if theirs_key in step_s and theirs_key != key:
            same = "" if distinct(times[key], times[theirs_key]) else " (same: ranges overlap)"
            vs_peft = f"{value / step_s[theirs_key]:.3f}x{same}"
        ms = spread([t * 1e3 for t in times[key]], "{:.1f}")
        lines.append(f"| {key} | {ms} | {value / base:.3f}x | {vs_peft} | {peak[key] / 2**20:.0f} |")
    lines.append("")
    suffix = "" if (BATCH, SEQ) == (8, 512) else f"_b{BATCH}x{SEQ}"
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / f"gpu_step{suffix}.md"
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"step_s": times, "peak_bytes": peak}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
