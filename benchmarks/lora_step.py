"""One LoRA training step on the SmolLM2-135M shape: deltatune vs the frozen-base floor vs peft, interleaved.

Batch 4 x 128 tokens, r=8 on q,k,v,o, fwd + bwd + AdamW. The floor is the frozen base with gradients only for
its input embeddings: the least any method that trains inside the network must compute. Writes
benchmarks/results/lora_step.md. Run: `make bench` (or `python benchmarks/lora_step.py --rounds 10`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    interleaved,
    median,
    peak_rss_mb,
    provenance,
    saved_activation_bytes,
    smollm2_shaped,
    spread,
    verdict,
    write_results,
)

import deltatune as dt  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 4, 128


def variant_names() -> list[str]:
    try:
        import peft  # noqa: F401

        return ["floor", "deltatune", "peft"]
    except ImportError:
        return ["floor", "deltatune"]


def make_variant(name: str, dropout: float):
    """(model, loss function, optimizer or None) for one variant."""
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    if name == "floor":
        floor = smollm2_shaped()
        floor.requires_grad_(False)
        embeds = floor.get_input_embeddings()(ids).detach()
        return floor, lambda: floor(inputs_embeds=embeds.clone().requires_grad_(True), labels=ids).loss, None
    lib = dt if name == "deltatune" else __import__("peft")
    model = lib.get_peft_model(
        smollm2_shaped(), lib.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
    ).train()
    return model, lambda: model(input_ids=ids, labels=ids).loss, _adamw(model)


def _adamw(model):
    # fused: what both libraries' users get (transformers.Trainer's default optimizer on torch >= 2.8, deltatune's
    # trainer on CPU and CUDA)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def _step_fn(loss_fn, opt):
    def step():
        loss_fn().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def inference_latency(rounds: int) -> dict[str, list[float]]:
    """Forward latency (no grad) of the base vs the same model after LoRA merge_and_unload vs LoRA unmerged."""
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    base = smollm2_shaped().eval()
    unmerged = dt.get_peft_model(smollm2_shaped(), dt.LoraConfig(r=8, target_modules=TARGETS)).eval()
    merged = dt.get_peft_model(smollm2_shaped(), dt.LoraConfig(r=8, target_modules=TARGETS)).merge_and_unload().eval()

    def fwd(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)

        return run

    return interleaved({"base": fwd(base), "merged": fwd(merged), "unmerged": fwd(unmerged)}, rounds)


def variant_peak_rss_mb(variant: str, dropout: float) -> float:
    """Peak RSS of 3 training steps of one variant in a fresh process (`common.peak_rss_mb`)."""
    setup = f"import lora_step as b; m, loss, opt = b.make_variant({variant!r}, {dropout}); s = b._step_fn(loss, opt)"
    return peak_rss_mb(setup, "s()")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()

    variants = {name: make_variant(name, args.dropout) for name in variant_names()}
    saved = {name: saved_activation_bytes(m, loss) for name, (m, loss, _) in variants.items()}
    for m, _, _ in variants.values():
        m.zero_grad(set_to_none=True)
    times = interleaved({n: _step_fn(loss, opt) for n, (_, loss, opt) in variants.items()}, args.rounds)
    del variants
    latency = inference_latency(args.rounds)
    rss = {name: variant_peak_rss_mb(name, args.dropout) for name in variant_names()}
    results = dict(step_s=times, saved_bytes=saved, latency_s=latency, peak_rss_mb=rss, rounds=args.rounds)
    write_results("lora_step", render(results, args), results)


def render(r: dict, args) -> list[str]:
    times, a, lat, rss = r["step_s"], r["saved_bytes"], r["latency_s"], r["peak_rss_mb"]
    s = {k: median(v) for k, v in times.items()}
    ratio = {k: [t / f for t, f in zip(v, times["floor"], strict=True)] for k, v in times.items()}
    rows = [
        "# LoRA training step: SmolLM2-135M shape, batch 4 x 128, r=8 on q,k,v,o",
        "",
        *provenance(args.rounds, "one fwd+bwd+AdamW (fused) step per variant per round, interleaved in one process"),
        f"- lora_dropout={args.dropout}; saved activations counted once per variant; peak RSS per variant in a fresh "
        "process, reset after the model is built and one warm-up step ran",
        "",
        "| variant | step time (s), median (min-max) | vs floor, per-round ratio | vs peft | saved activations (MiB) "
        "| vs floor | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in s:
        vs_peft = f"{s[name] / s['peft']:.3f}x" if "peft" in s else "n/a"
        rows.append(
            f"| {name} | {spread(times[name])} | {spread(ratio[name])}x | {vs_peft} | {a[name] / 2**20:.1f} | "
            f"{a[name] / a['floor']:.3f}x | {rss[name]:.0f} |"
        )
    lat_med = {k: median(v) for k, v in lat.items()}
    rows += ["", "## Inference latency (forward, no grad)", "", "| model | latency (s), median (min-max) | vs base |"]
    rows += ["|---|---|---|"]
    rows += [f"| {k} | {spread(v, '{:.4f}')} | {lat_med[k] / lat_med['base']:.3f}x |" for k, v in lat.items()]
    step_ratio = median(ratio["deltatune"])
    targets = [
        ("deltatune step <= 1.05x floor (issue 24)", step_ratio <= 1.05, f"{step_ratio:.3f}x"),
        (
            "merged latency <= 1.02x base",
            lat_med["merged"] / lat_med["base"] <= 1.02,
            f"{lat_med['merged'] / lat_med['base']:.3f}x",
        ),
        (
            "saved activations <= 1.10x floor",
            a["deltatune"] / a["floor"] <= 1.10,
            f"{a['deltatune'] / a['floor']:.3f}x",
        ),
    ]
    if "peft" in s:
        targets.insert(
            1,
            (
                "deltatune step <= 0.90x peft (issue 24)",
                s["deltatune"] <= 0.90 * s["peft"],
                f"{s['deltatune'] / s['peft']:.3f}x",
            ),
        )
    rows += ["", "## Targets", "", "| target | result |", "|---|---|"]
    rows += [f"| {name} | {verdict(met)} {value} |" for name, met, value in targets]
    return rows


if __name__ == "__main__":
    main()
