"""4-bit quantization on this CPU: dequantize throughput, 4-bit vs fp32 matmul, QLoRA vs LoRA memory.

Compared with bitsandbytes' CPU path in the same process where it imports. Writes results/quant.md.
Run: python benchmarks/quant.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, provenance, smollm2_shaped, spread, verdict, write_results  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.quant import Linear4bit, dequantize_4bit, quantize_4bit  # noqa: E402

SHAPE = (1536, 576)  # SmolLM2-135M's MLP up/gate projection


def dequant_and_matmul(rounds: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    w = torch.randn(*SHAPE)
    ours = quantize_4bit(w)
    fns = {"deltatune dequantize (nf4, double quant)": lambda: dequantize_4bit(ours)}
    try:
        import bitsandbytes.functional as bnb

        q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        fns["bitsandbytes dequantize (nf4, double quant)"] = lambda: bnb.dequantize_4bit(q, state)
    except ImportError:
        pass
    linear = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    q4 = Linear4bit.from_linear(linear, dt.QuantConfig(compute_dtype="fp32"))
    x = torch.randn(512, SHAPE[1])
    with torch.no_grad():
        fns["fp32 matmul (512 x 576 -> 1536)"] = lambda: linear(x)
        fns["4-bit matmul, deltatune (dequantize + fp32 matmul)"] = lambda: q4(x)
        return interleaved(fns, rounds, warmup=2)


def step_peak_rss(variant: str, embed_dtype: str) -> float:
    """Peak RSS (VmHWM reset after setup and one step) of 3 training steps in a fresh process."""
    code = (
        "import sys, re, torch; sys.path.insert(0, 'benchmarks'); import quant as b; "
        f"step = b.make_step({variant!r}, {embed_dtype!r}); step(); "
        "open('/proc/self/clear_refs', 'w').write('5'); [step() for _ in range(3)]; "
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def make_step(variant: str, embed_dtype: str):
    model = smollm2_shaped()
    if variant == "qlora":
        dt.quantize_model(model, dt.QuantConfig(compute_dtype="fp32"))
        model.to(getattr(torch, embed_dtype))  # embeddings (tied head) and norms; 4-bit constants keep fp32
    model = dt.get_peft_model(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def base_bytes(embed_dtype: str) -> tuple[int, int]:
    """(bytes of the fp32 base, bytes of the 4-bit base incl. all quantization constants and unquantized parts)."""
    fp32 = sum(p.numel() * 4 for p in smollm2_shaped().parameters())
    model = dt.quantize_model(smollm2_shaped(), dt.QuantConfig())
    model.to(getattr(torch, embed_dtype))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = sum(m.state().nbytes() for m in model.modules() if isinstance(m, Linear4bit))
    return fp32, dense + packed


def main() -> None:
    rounds = 30
    times = dequant_and_matmul(rounds)
    ops = {k: median(v) for k, v in times.items()}
    out_bytes = SHAPE[0] * SHAPE[1] * 4
    lines = [
        "# 4-bit quantization (NF4, blocks of 64, double quantization) on this CPU",
        "",
        *provenance(rounds, f"each operation once per round, interleaved; weight {SHAPE[0]}x{SHAPE[1]}"),
        "- peak RSS: a fresh process per setup, reset after the model is built and one warm-up step ran",
        "",
        "| operation | time (ms), median (min-max) | GB/s of fp32 output |",
        "|---|---|---|",
    ]
    for name, secs in ops.items():
        rate = f"{out_bytes / secs / 1e9:.2f}" if name.split()[1] == "dequantize" else ""
        lines.append(f"| {name} | {spread([t * 1e3 for t in times[name]])} | {rate} |")
    ratio = ops["4-bit matmul, deltatune (dequantize + fp32 matmul)"] / ops["fp32 matmul (512 x 576 -> 1536)"]
    lines += [
        "",
        f"4-bit matmul / fp32 matmul time: {ratio:.2f}x.",
        "",
        "## QLoRA vs 16-bit LoRA, SmolLM2-135M shape (LoRA r=8 on all linear layers, batch 4 x 128)",
        "",
        "| setup | base weight bytes (MiB) | vs fp32 base | step peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    fp32, _ = base_bytes("float32")
    results = {"ops_s": times, "fp32_base_bytes": fp32, "rounds": rounds}
    lines.append(f"| LoRA, fp32 base | {fp32 / 2**20:.1f} | 1.000x | {step_peak_rss('lora', 'float32'):.0f} |")
    shares = []
    for embed in ("float32", "bfloat16"):
        _, q = base_bytes(embed)
        rss = step_peak_rss("qlora", embed)
        results[f"qlora_{embed}"] = {"base_bytes": q, "peak_rss_mb": rss}
        shares.append(q / fp32)
        lines.append(
            f"| QLoRA, 4-bit linears (fp32 constants), embeddings/norms in {embed} | {q / 2**20:.1f} | {q / fp32:.3f}x "
            f"| {rss:.0f} |"
        )
    lines += [
        "",
        "The 4-bit layers' quantization constants stay float32 whatever `.to(dtype)` the model gets (pinned); only the "
        "unquantized parts (embeddings, norms) follow it.",
        "",
        f"Target: 4-bit base weights <= 30% of the fp32 base's bytes: {verdict(min(shares) <= 0.30)} "
        f"({', '.join(f'{x:.1%}' for x in shares)}; the float32-embeddings row is "
        f"{verdict(shares[0] <= 0.30)}: SmolLM2's 49k x 576 embedding alone is 108 MiB in fp32).",
    ]
    write_results("quant", lines, results)


if __name__ == "__main__":
    main()
