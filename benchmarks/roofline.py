"""The quickstart's training step against this machine's matmul peak, measured in one process.

Peak: a square float32 matmul (torch, all threads), the most FLOP/s this CPU gives a dense kernel. Step: the
quickstart's own run (bundled SmolLM2-135M-Instruct, LoRA r=8 on q,k,v,o, its data, batch 8), its optimizer steps
timed one by one through the trainer; the two are interleaved round by round so machine noise hits both alike.

Useful FLOPs of a step, counted from its batch (padding counts for nothing):
- frozen base body, N_body parameters in its linear layers: 2·N_body per token forward, 2·N_body backward (the
  gradient of each layer's input; frozen weights get none);
- LoRA, per adapted module of d_in -> d_out: 2·r·(d_in + d_out) forward, twice that backward (input and weight
  gradients);
- attention scores and weighted values: 4·d per (query, key) pair per layer forward, twice that backward; causal
  over an example's own n tokens, after the p shared prompt tokens it opens with: n·p + n²/2 pairs (a padded row
  of t tokens: t²/2);
- output head (d x V, tied to the embedding): 2·d·V forward + 2·d·V backward at each position that predicts a
  response token (the trainer computes it nowhere else).
Writes benchmarks/results/roofline.md (`--name`: another results name, e.g. for a run under
scripts/slow_machine.sh). Run: `python benchmarks/roofline.py --rounds 6`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import median, provenance, spread, verdict, write_results  # noqa: E402

from deltatune.train import load_train_config  # noqa: E402
from deltatune.train.data import step_indices  # noqa: E402
from deltatune.train.trainer import _micro_batches, _setup, _train_step  # noqa: E402

TARGET = 0.70
PEAK_N = 2048


def matmul_flops_per_s() -> float:
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    a @ b
    t = time.perf_counter()
    for _ in range(4):
        a @ b
    return 4 * 2 * PEAK_N**3 / (time.perf_counter() - t)


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def time_split(run, step: int) -> dict:
    """One step under torch's profiler: the time in matmul kernels and their FLOPs (from their shapes), the time in
    everything else, and the other ops that take most of it. The profiler slows small ops more than large ones, so
    read the shares, not the absolute times."""
    from torch.profiler import ProfilerActivity, profile

    with (
        run.objective.training_layout(run.model),
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
    ):
        _train_step(run, step)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm_seconds = mm_flops = 0.0
    others: dict[str, float] = {}
    for e in events:
        if e.key in MATMULS:
            mm_seconds += e.self_cpu_time_total / 1e6
            shapes = [s for s in e.input_shapes if s][-2:]  # (addmm: bias first) the two matrices
            (*batch, m, k), (_, n) = shapes[0], shapes[1][-2:]
            mm_flops += 2 * m * k * n * e.count * (batch[0] if batch else 1)
        else:
            others[e.key] = others.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    top = sorted(others.items(), key=lambda kv: -kv[1])[:8]
    return dict(total_s=total, matmul_s=mm_seconds, matmul_flops=mm_flops, top_other=top)


def step_flops(run, step: int) -> tuple[float, int, int, dict[str, float]]:
    """(useful FLOPs, tokens computed, padded tokens) of optimizer step `step`, and the FLOPs by part."""
    base = run.model.get_base_model()
    cfg = base.config
    layers, d, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    weights = [(n, p) for n, p in base.named_parameters() if n.startswith("model.layers.") and p.ndim == 2]
    body = sum(p.numel() for _, p in weights if not p.requires_grad)  # the frozen linear layers
    lora = sum(p.numel() for _, p in weights if p.requires_grad)  # A (r x d_in) and B (d_out x r) of each module
    parts = dict.fromkeys(("base body", "LoRA", "attention", "output head"), 0.0)
    real = padded = 0
    for batch in _micro_batches(run, step):
        # a padding-free micro-batch is one row: each example's own tokens, after the shared ones it opens with
        own = batch.get("segment_lengths", batch["attention_mask"].sum(1)).float()
        shared = batch.get("prefix_lengths", torch.zeros_like(own)).float()
        tokens = int(batch["attention_mask"].sum())
        real, padded = real + tokens, padded + batch["attention_mask"].numel()
        parts["base body"] += 4 * body * tokens
        parts["LoRA"] += 6 * lora * tokens
        parts["attention"] += 12 * layers * d * float((own * shared + own**2 / 2).sum())
        parts["output head"] += 4 * d * vocab * run.objective.count(batch)
    return sum(parts.values()), real, padded, parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--name", default="roofline")
    args = parser.parse_args()
    cfg = load_train_config(None, ["output_dir=runs/roofline-bench", "generate_eval=0"])
    run = _setup(cfg, False, None, None)
    run.model.train()
    _train_step(run, 0)  # warm-up (allocator, first-call costs)
    peaks, steps, shares, tok_s, seconds_per_step = [], [], [], [], []
    for r in range(args.rounds):
        step = 1 + r
        flops, real, _, _ = step_flops(run, step)
        if r % 2 == 0:  # the two alternate which runs first
            peaks.append(matmul_flops_per_s())
        t = time.perf_counter()
        with run.objective.training_layout(run.model):
            _train_step(run, step)
        seconds = time.perf_counter() - t
        if r % 2 == 1:
            peaks.append(matmul_flops_per_s())
        seconds_per_step.append(seconds)
        steps.append(flops / seconds)
        tok_s.append(real / seconds)
        shares.append(steps[-1] / peaks[-1])
    _, real, padded, parts = step_flops(run, 1)
    split = time_split(run, 1)
    split["peak_after"] = matmul_flops_per_s()
    results = dict(
        rounds=args.rounds,
        matmul_flops_per_s=peaks,
        step_flops_per_s=steps,
        share=shares,
        tokens_per_s=tok_s,
        step_seconds=seconds_per_step,
        tokens_unshared_step2=unshared_tokens(run, 1),
        flops_by_part_step2=parts,
        tokens_step2={"real": real, "padded": padded},
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        padding_free=run.objective.padding_free,
        head_on_responses=run.objective.head_on_responses,
        profiled_step2=split,
    )
    write_results(args.name, render(results), results)


def unshared_tokens(run, step: int) -> int:
    """Tokens optimizer step `step` would compute with each example whole (no shared prefixes, nothing left out)."""
    local = run.cfg.optim.batch_size * run.cfg.optim.grad_accum
    indices = step_indices(len(run.train_set), local, step, run.cfg.seed)
    return sum(len(run.train_set[i].input_ids) for i in indices)


def render(results: dict) -> list[str]:
    peaks, steps, shares, tok_s = (
        results[k] for k in ("matmul_flops_per_s", "step_flops_per_s", "share", "tokens_per_s")
    )
    parts, real, padded = results["flops_by_part_step2"], *results["tokens_step2"].values()
    share = median(shares)
    body = parts["base body"] / (4 * real)
    return [
        "# Roofline: the quickstart's training step vs this machine's matmul peak",
        "",
        *provenance(results["rounds"], f"one {PEAK_N}^3 float32 matmul peak and one quickstart step per round"),
        f"- padding-free rows: {results['padding_free']}; output head at response positions only: "
        f"{results['head_on_responses']}",
        f"- CPU kernels: torch {torch.backends.cpu.get_cpu_capability()}",
        "",
        "| measure | median (min-max) |",
        "|---|---|",
        f"| matmul peak (GFLOP/s) | {spread([p / 1e9 for p in peaks], '{:.1f}')} |",
        f"| quickstart step, useful GFLOP/s | {spread([s / 1e9 for s in steps], '{:.1f}')} |",
        f"| share of peak, per round | {spread(shares, '{:.2f}')} |",
        f"| quickstart training tokens/s | {spread(tok_s, '{:.0f}')} |",
        f"| seconds per optimizer step | {spread(results['step_seconds'], '{:.2f}')} |",
        "",
        f"FLOPs of one step (step 2: {real} tokens computed, {results['tokens_unshared_step2']} in its examples "
        f"whole: shared prompt prefixes are computed once and tokens that predict nothing are left out; "
        f"{padded - real} of padding; linear weights of the body N_body = {body / 1e6:.1f}M):",
        "",
        "| part | GFLOP | share |",
        "|---|---|---|",
        *(f"| {k} | {v / 1e9:.1f} | {v / sum(parts.values()):.1%} |" for k, v in parts.items()),
        "",
        *_split_lines(results["profiled_step2"]),
        "## Target",
        "",
        "| target | result |",
        "|---|---|",
        f"| quickstart step >= {TARGET:.0%} of the measured matmul peak | {verdict(share >= TARGET)} {share:.0%} |",
    ]


def _split_lines(split: dict) -> list[str]:
    mm_share = split["matmul_s"] / split["total_s"]
    mm_rate = split["matmul_flops"] / split["matmul_s"]
    return [
        "",
        "Where the step's time goes (step 2 once more, under torch's profiler, then the matmul peak again):",
        "",
        f"- matmul kernels: {mm_share:.0%} of the step's time, at {mm_rate / 1e9:.0f} GFLOP/s = "
        f"{mm_rate / split['peak_after']:.0%} of the {split['peak_after'] / 1e9:.0f} GFLOP/s peak measured just "
        f"after; so with every other op free the step would reach about {mm_rate / split['peak_after']:.0%} of "
        "the peak",
        f"- everything else: {1 - mm_share:.0%}; the largest: "
        + ", ".join(f"{name} {seconds / split['total_s']:.1%}" for name, seconds in split["top_other"]),
        "",
    ]


if __name__ == "__main__":
    Console().print("roofline: loading the bundled model")
    main()
