"""VeLoRA vs LoRA: what backward keeps and what a step costs, interleaved in one process. SmolLM2-135M shape, batch
4 x 128, r=8, dropout 0.05, fwd + bwd + AdamW, on q,k,v,o and on every linear of the blocks (where the MLP's wide
inputs are compressed too). Writes results/velora_memory.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    interleaved,
    provenance,
    round_ratios,
    saved_activation_bytes,
    smollm2_shaped,
    spread,
    write_results,
)
from lora_step import BATCH, SEQ, _step_fn, make_variant  # noqa: E402

import deltatune as dt  # noqa: E402

TARGET_SETS = {
    "q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
GROUPS = 64  # peft's default num_groups


def make(targets: list[str], velora: bool, dropout: float):
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    config = dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                           velora_config=dt.VeloraConfig(num_groups=GROUPS) if velora else None)  # fmt: skip
    model = dt.get_peft_model(smollm2_shaped(), config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, lambda: model(input_ids=ids, labels=ids).loss, opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    built = {"floor": make_variant("floor", args.dropout)}
    for label, targets in TARGET_SETS.items():
        built[f"LoRA {label}"] = make(targets, False, args.dropout)
        built[f"VeLoRA {label}"] = make(targets, True, args.dropout)
    saved = {v: saved_activation_bytes(m, loss) for v, (m, loss, _) in built.items()}
    times = interleaved({v: _step_fn(loss, opt) for v, (_, loss, opt) in built.items()}, args.rounds)
    write(dict(step_s=times, saved_bytes=saved, rounds=args.rounds, dropout=args.dropout))


def write(r: dict) -> None:
    times, saved = r["step_s"], r["saved_bytes"]
    lines = [
        f"# VeLoRA vs LoRA: SmolLM2-135M shape, batch {BATCH} x {SEQ}, r=8, lora_dropout={r['dropout']}, "
        f"num_groups={GROUPS}",
        "",
        *provenance(r["rounds"], "one fwd+bwd+AdamW step per variant per round, interleaved in one process"),
        "- saved activations: distinct storages autograd keeps for backward (benchmarks/common.py)",
        "",
        "| variant | step (s), median (min-max) | saved activations (MiB) | vs floor |",
        "|---|---|---|---|",
    ]
    for v in times:
        lines.append(f"| {v} | {spread(times[v])} | {saved[v] / 2**20:.1f} | {saved[v] / saved['floor']:.3f}x |")
    lines.append("")
    for label in TARGET_SETS:
        lora, velora = f"LoRA {label}", f"VeLoRA {label}"
        lines.append(
            f"- {label}: VeLoRA keeps {(saved[lora] - saved[velora]) / 2**20:.1f} MiB less than LoRA "
            f"({saved[velora] / saved[lora]:.3f}x); step time VeLoRA / LoRA per round: median "
            f"{round_ratios(times[velora], times[lora])}"
        )
    write_results("velora_memory", lines, r)


if __name__ == "__main__":
    main()
