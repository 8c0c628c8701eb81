"""Trainer overhead: `deltatune train`'s step vs a hand-written minimal PyTorch loop on the same LoRA model and batches.

Both run the bundled quickstart data on SmolLM2-135M-Instruct (LoRA r=8 q,k,v,o, batch 8), interleaved step by step
in one process. Also records the quickstart's peak RSS (a separate process). Writes results/train_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deltatune.train import load_train_config
from deltatune.train import trainer as T
from deltatune.train.data import IGNORE

sys.path.insert(0, str(Path(__file__).parent))
from common import median  # noqa: E402


def minimal_step(model: nn.Module, opt, sched, batch: dict[str, torch.Tensor]) -> float:
    """The floor: forward, token-mean CE on response tokens, backward, clip, AdamW, schedule."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def step_overhead(steps: int) -> dict[str, float]:
    cfg = load_train_config(None, [f"optim.steps={steps}", "output_dir=/tmp/deltatune-bench"])
    ours, floor = T._setup(cfg, False, None, None), T._setup(cfg, False, None, None)
    batches = [T._micro_batches(floor, i)[0] for i in range(steps)]
    times: dict[str, list[float]] = {"deltatune train step": [], "minimal loop step": []}
    tokens = []
    for i in range(steps):
        t = time.perf_counter()
        T._train_step(ours, i)
        times["deltatune train step"].append(time.perf_counter() - t)
        t = time.perf_counter()
        minimal_step(floor.model, floor.optimizer, floor.scheduler, batches[i])
        times["minimal loop step"].append(time.perf_counter() - t)
        tokens.append(int(batches[i]["attention_mask"].sum()))
    tok = sum(tokens) / len(tokens)
    return {name: median(v[1:]) for name, v in times.items()} | {"tokens_per_step": tok}


def quickstart_peak_rss(out: Path) -> tuple[float, float]:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "quickstart", "--out", str(out)], check=True, capture_output=True
    )
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_overhead.md")
    args = parser.parse_args()
    r = step_overhead(args.steps)
    ours, floor = r["deltatune train step"], r["minimal loop step"]
    lines = [
        "# Trainer overhead: SmolLM2-135M-Instruct, LoRA r=8 q,k,v,o, quickstart data, batch 8",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps - 1} interleaved "
        f"steps (first dropped); {r['tokens_per_step']:.0f} tokens per step.",
        "",
        "| loop | step time (s) | tokens/s | vs minimal loop |",
        "|---|---|---|---|",
    ]
    for name, value in (("deltatune train step", ours), ("minimal loop step", floor)):
        lines.append(f"| {name} | {value:.3f} | {r['tokens_per_step'] / value:.0f} | {value / floor:.3f}x |")
    lines += ["", "Target: deltatune <= 1.05x the minimal loop's step time.", ""]
    result = {"step_s": {"deltatune": ours, "minimal": floor}, "tokens_per_step": r["tokens_per_step"]}
    if not args.skip_quickstart:
        rss, secs = quickstart_peak_rss(Path("/tmp/deltatune-bench-qs"))
        lines += [
            f"Full quickstart (`deltatune quickstart`, 60 steps, 64-example before/after scoring): peak RSS "
            f"{rss:.0f} MiB, {secs:.0f} s wall (model already converted).",
            "",
        ]
        result |= {"quickstart_peak_rss_mb": rss, "quickstart_seconds": secs}
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
