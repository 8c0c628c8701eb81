"""Lean DoRA (`deltatune.functional.dora.dora_linear`) vs DoRA as a plain autograd expression (deltatune's previous
forward, kept here as the reference), LoRA and the frozen-base floor: saved activations and step time, interleaved in
one process. SmolLM2-135M shape, batch 4 x 128, r=8 on q,k,v,o, fwd + bwd + AdamW. Writes results/dora_lean.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    interleaved,
    median,
    provenance,
    round_ratios,
    saved_activation_bytes,
    smollm2_shaped,
    spread,
    verdict,
    write_results,
)
from lora_step import BATCH, SEQ, TARGETS, _step_fn, make_variant  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.methods.dora import DoraVariant  # noqa: E402


def autograd_forward(self, layer, name, x, result):
    """DoRA's forward as one autograd expression (what deltatune ran before the lean version): autograd saves the
    base term and the LoRA term separately, and with dropout the dropped input and its mask."""
    a = layer.lora_A[name].weight.to(x.dtype)
    b = layer.lora_B[name].weight.to(x.dtype)
    scale = (layer.lora_magnitude_vector[name] / self._norm(layer, name)).to(x.dtype)
    p = layer.dropout_p[name]
    if layer.training and p > 0:
        x = F.dropout(x, p, training=True)
        base_out = x @ layer.weight_out_in().to(x.dtype).T
    else:
        bias = getattr(layer.base_layer, "bias", None)
        base_out = result - bias if bias is not None else result
    lora_out = (x @ a.T) @ b.T * layer.scaling[name]
    return result + ((scale - 1) * base_out + scale * lora_out).to(result.dtype)


class AutogradDora(DoraVariant):
    forward = autograd_forward


def make(variant: str, dropout: float):
    """(model, loss function, optimizer or None); the floor is lora_step's (frozen base, input gradient)."""
    if variant == "floor":
        return make_variant("floor", dropout)
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    config = dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS,
                           use_dora=variant != "LoRA")  # fmt: skip
    model = dt.get_peft_model(smollm2_shaped(), config).train()
    if variant == "DoRA (autograd expression)":
        reference = AutogradDora()
        for module in model.modules():
            if getattr(module, "variant", None):
                module._variant_for = lambda flag: reference
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, lambda: model(input_ids=ids, labels=ids).loss, opt


VARIANTS = ["floor", "LoRA", "DoRA (autograd expression)", "DoRA lean"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    built = {v: make(v, args.dropout) for v in VARIANTS}
    saved = {v: saved_activation_bytes(m, loss) for v, (m, loss, _) in built.items()}
    grads = {}
    for v in ("DoRA (autograd expression)", "DoRA lean"):  # same seed, same mask source: equal gradients
        model, loss, _ = built[v]
        model.zero_grad(set_to_none=True)
        model.eval()
        loss().backward()
        grads[v] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        model.train()
    worst = max(
        ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
        for a, b in zip(grads["DoRA lean"], grads["DoRA (autograd expression)"], strict=True)
    )
    times = interleaved({v: _step_fn(loss, opt) for v, (_, loss, opt) in built.items()}, args.rounds)
    write(dict(step_s=times, saved_bytes=saved, rounds=args.rounds, dropout=args.dropout, grad_rel_diff=worst))


def write(r: dict) -> None:
    times, saved = r["step_s"], r["saved_bytes"]
    floor_saved = saved["floor"]
    lean, plain = times["DoRA lean"], times["DoRA (autograd expression)"]
    time_ratio = median([a / b for a, b in zip(lean, plain, strict=True)])
    lines = [
        f"# Lean DoRA: SmolLM2-135M shape, batch {BATCH} x {SEQ}, r=8 on q,k,v,o, lora_dropout={r['dropout']}",
        "",
        *provenance(r["rounds"], "one fwd+bwd+AdamW step per variant per round, interleaved in one process"),
        "- the autograd expression is deltatune's previous DoRA forward (kept in this benchmark as the reference)",
        "",
        "| variant | step (s), median (min-max) | saved activations (MiB) | vs floor |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS:
        lines.append(f"| {v} | {spread(times[v])} | {saved[v] / 2**20:.1f} | {saved[v] / floor_saved:.3f}x |")
    lean_saved = saved["DoRA lean"] / floor_saved
    lines += [
        "",
        f"Lean / autograd step time, per round: median {round_ratios(lean, plain)}; "
        f"lean vs LoRA step: {median(lean) / median(times['LoRA']):.3f}x. Gradients, lean vs autograd expression (eval "
        f"mode, no dropout): largest difference {r['grad_rel_diff']:.1e} of the largest gradient entry.",
        "",
        "| target | result |",
        "|---|---|",
        f"| lean DoRA saved activations <= 1.25x floor | {verdict(lean_saved <= 1.25)} {lean_saved:.3f}x |",
        f"| lean DoRA step <= 1.10x the autograd expression's | {verdict(time_ratio <= 1.10)} {time_ratio:.3f}x |",
    ]
    write_results("dora_lean", lines, r)


if __name__ == "__main__":
    main()
