"""Trainer overhead: `deltatune train`'s step vs a hand-written minimal PyTorch loop on the same LoRA model and batches.

Both run the bundled quickstart data on SmolLM2-135M-Instruct (LoRA r=8 q,k,v,o, batch 8), interleaved step by step
in one process. Also records the quickstart's peak RSS (a separate process). Writes results/train_overhead.md.
"""

from __future__ import annotations

import argparse
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
from common import median, provenance, spread, verdict, write_results  # noqa: E402


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


def step_overhead(steps: int) -> tuple[dict[str, list[float]], float]:
    cfg = load_train_config(None, [f"optim.steps={steps}", "output_dir=/tmp/deltatune-bench"])
    ours, floor = T._setup(cfg, False, None, None), T._setup(cfg, False, None, None)
    batches = [T._micro_batches(floor, i)[0] for i in range(steps)]
    times: dict[str, list[float]] = {"deltatune train step": [], "minimal loop step": []}
    tokens = []
    runs = {
        "deltatune train step": lambda i: T._train_step(ours, i),
        "minimal loop step": lambda i: minimal_step(floor.model, floor.optimizer, floor.scheduler, batches[i]),
    }
    for i in range(steps):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]  # alternate which loop goes first
        for name in order:
            t = time.perf_counter()
            runs[name](i)
            times[name].append(time.perf_counter() - t)
        tokens.append(int(batches[i]["attention_mask"].sum()))
    return {name: v[1:] for name, v in times.items()}, sum(tokens) / len(tokens)


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
    args = parser.parse_args()
    times, tokens = step_overhead(args.steps)
    ours, floor = median(times["deltatune train step"]), median(times["minimal loop step"])
    ratios = [a / b for a, b in zip(times["deltatune train step"], times["minimal loop step"], strict=True)]
    lines = [
        "# Trainer overhead: SmolLM2-135M-Instruct, LoRA r=8 q,k,v,o, quickstart data, batch 8",
        "",
        *provenance(args.steps - 1, "the same training step of both loops, interleaved (first step dropped)"),
        f"- {tokens:.0f} tokens per step on average",
        "",
        "| loop | step time (s), median (min-max) | tokens/s | vs minimal loop, per-step ratio |",
        "|---|---|---|---|",
    ]
    for name, value in (("deltatune train step", ours), ("minimal loop step", floor)):
        ratio = spread(ratios) + "x" if name.startswith("deltatune") else "1.000x"
        lines.append(f"| {name} | {spread(times[name])} | {tokens / value:.0f} | {ratio} |")
    lines += ["", f"Target: deltatune <= 1.05x the minimal loop's step time: {verdict(median(ratios) <= 1.05)}.", ""]
    result = {"step_s": times, "tokens_per_step": tokens}
    if not args.skip_quickstart:
        rss, secs = quickstart_peak_rss(Path("/tmp/deltatune-bench-qs"))
        lines += [
            f"Full quickstart (`deltatune quickstart`, one run, model already converted): {secs:.0f} s wall, peak RSS "
            f"{rss:.0f} MiB (loading included: what a user sees).",
        ]
        result |= {"quickstart_peak_rss_mb": rss, "quickstart_seconds": secs}
    write_results("train_overhead", lines, result)


if __name__ == "__main__":
    main()
