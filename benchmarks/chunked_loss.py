"""Chunked output-head loss (`deltatune.chunked_loss`) vs the full head, time and memory, interleaved in one process.

Two cases, both LoRA r=8 on q,k,v,o of SmolLM2-135M's shape (vocabulary 49,152):
- the quickstart step (`deltatune train` on the bundled data and the real SmolLM2, `optim.chunked_loss` on / off;
  the head already runs on response positions only, so the logits are small here);
- a long all-response batch (every position predicted, as in pre-training-style or long-answer data), where the
  logits and their gradient are the step's largest tensors: loss + backward, full head vs chunked.
Memory: the step's peak RSS in a fresh process (Linux VmHWM, reset after a warm-up step) and the bytes autograd
saves for backward. Writes results/chunked_loss.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    interleaved,
    peak_rss_mb,
    provenance,
    round_ratios,
    saved_activation_bytes,
    smollm2_shaped,
    spread,
    write_results,
)

import deltatune as dt  # noqa: E402
from deltatune.chunked_loss import head_returns_inputs, linear_cross_entropy  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def long_batch_model(chunked: bool, batch: int, seq: int):
    """(model, loss function) for the all-response batch."""
    model = dt.get_peft_model(smollm2_shaped(), dt.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (batch, seq), generator=g)
    targets = ids[:, 1:]
    head = model.get_base_model().lm_head

    def loss() -> torch.Tensor:
        if chunked:
            with head_returns_inputs(head):
                hidden = model(input_ids=ids).logits
            return linear_cross_entropy(hidden[:, :-1], head.weight, targets, reduction="mean")
        logits = model(input_ids=ids).logits
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())

    return model, loss


def quickstart_run(chunked: bool):
    from deltatune.train import load_train_config
    from deltatune.train import trainer as T

    flag = "true" if chunked else "false"
    cfg = load_train_config(None, [f"optim.chunked_loss={flag}", "optim.steps=80", "output_dir=/tmp/dt-bench-chunk"])
    run = T._setup(cfg, False, None, None)
    assert (run.objective.chunked_head is not None) == chunked
    steps = iter(range(10**6))
    return run, lambda: T._train_step(run, next(steps) % 80)


def case_peak_rss_mb(case: str, chunked: bool, batch: int, seq: int) -> float:
    """Peak RSS of 3 steps of one case in a fresh process (`common.peak_rss_mb`)."""
    if case == "quickstart":
        return peak_rss_mb(f"import chunked_loss as b; s = b.quickstart_run({chunked})[1]", "s()")
    setup = f"import chunked_loss as b; m, f = b.long_batch_model({chunked}, {batch}, {seq})"
    return peak_rss_mb(setup, "(f().backward(), m.zero_grad(set_to_none=True))")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    results: dict = {"rounds": args.rounds, "batch": args.batch, "seq": args.seq}

    long = {name: long_batch_model(name == "chunked", args.batch, args.seq) for name in ("full head", "chunked")}
    results["long_saved_bytes"] = {n: saved_activation_bytes(m, f) for n, (m, f) in long.items()}
    want = {n: float(f().detach()) for n, (m, f) in long.items()}
    results["long_loss"] = want

    def step(model, loss):
        def run():
            loss().backward()
            model.zero_grad(set_to_none=True)

        return run

    results["long_step_s"] = interleaved({n: step(m, f) for n, (m, f) in long.items()}, args.rounds)
    del long
    quick = {name: quickstart_run(name == "chunked") for name in ("full head", "chunked")}
    results["quickstart_step_s"] = interleaved({n: s for n, (_, s) in quick.items()}, args.rounds)
    del quick
    results["peak_rss_mb"] = {
        f"{case}/{name}": case_peak_rss_mb(case, name == "chunked", args.batch, args.seq)
        for case in ("long", "quickstart")
        for name in ("full head", "chunked")
    }
    write(results)


def write(r: dict) -> None:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    rss = r["peak_rss_mb"]
    long, quick = r["long_step_s"], r["quickstart_step_s"]
    lines = [
        "# Chunked output-head loss vs the full head",
        "",
        *provenance(r["rounds"], "interleaved steps (loss + backward; the quickstart case: whole optimizer steps)"),
        "- LoRA r=8 q,k,v,o, dropout 0.05; SmolLM2-135M shape (vocabulary 49,152); chunks of ~32 MiB of logits",
        "",
        f"## All-response batch {r['batch']} x {r['seq']} (random-init SmolLM2 shape)",
        "",
        "| | step s, median (min-max) | saved for backward (MiB) | peak RSS of the step (MiB) |",
        "|---|---|---|---|",
    ]
    for name in ("full head", "chunked"):
        saved = mib(r["long_saved_bytes"][name])
        lines.append(f"| {name} | {spread(long[name])} | {saved} | {rss['long/' + name]:.0f} |")
    lines += [
        "",
        f"chunked / full step time per round: median {round_ratios(long['chunked'], long['full head'])}; loss full "
        f"{r['long_loss']['full head']:.6f}, chunked {r['long_loss']['chunked']:.6f}.",
        "",
        "## The quickstart step (real SmolLM2, bundled data, head on response positions only)",
        "",
        "| | step s, median (min-max) | peak RSS of the step (MiB) |",
        "|---|---|---|",
    ]
    for name in ("full head", "chunked"):
        lines.append(f"| {name} | {spread(quick[name])} | {rss['quickstart/' + name]:.0f} |")
    lines += ["", f"chunked / full step time per round: median {round_ratios(quick['chunked'], quick['full head'])}."]
    write_results("chunked_loss", lines, r)


if __name__ == "__main__":
    main()
