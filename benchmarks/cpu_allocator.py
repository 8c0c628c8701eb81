"""The CPU allocator setting (`deltatune.train.host.freed_memory_kept`, applied by the CLI) on one LoRA step.

The setting is process-wide and fixed at start, so it cannot be interleaved within one process: fresh processes
alternate default / tuned, each timing 8 steps after a warm-up (SmolLM2-135M shape, batch 4, r=8 q,k,v,o, dropout
0.05, AdamW) with fixed and with varying sequence lengths, and reading its peak RSS. Writes results/cpu_allocator.md.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import distinct, provenance, spread, write_results  # noqa: E402

CHILD = """
import itertools, sys, re, time, torch
sys.path.insert(0, 'benchmarks')
from deltatune.train.host import freed_memory_kept
import lora_step as b
from common import reset_peak_rss
m, _, opt = b.make_variant('deltatune', 0.05)
if sys.argv[1] == 'tuned':  # as the CLI does: after the model is built, around the steps
    kept = freed_memory_kept()  # keep a reference: a collected context manager would restore the defaults at once
    assert kept.__enter__()
# "fixed": every batch 4 x 128; "varying": the length changes every step, as padded batches of real data do
lengths = itertools.cycle([128] if sys.argv[2] == 'fixed' else [72, 104, 88, 128, 64, 96, 120, 80])
gen = torch.Generator().manual_seed(0)
def step():
    ids = torch.randint(0, 49152, (4, next(lengths)), generator=gen)
    m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step()
reset_peak_rss()
times = []
for _ in range(8):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
rss = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024
print(sum(times), rss)
"""


def main(pairs: int = 3) -> None:
    runs: dict[str, list[tuple[float, float]]] = {}
    for shape in ("fixed", "varying"):
        for i in range(pairs):
            modes = ["default", "tuned"] if i % 2 == 0 else ["tuned", "default"]  # alternate which goes first
            for mode in modes:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, mode, shape], capture_output=True, text=True, check=True
                )
                seconds, rss = map(float, out.stdout.split()[-2:])
                runs.setdefault(f"{mode}, {shape} shapes", []).append((seconds, rss))
    lines = [
        "# CPU allocator setting (CLI only): 8 LoRA steps (SmolLM2-135M shape, batch 4, r=8 q,k,v,o)",
        "",
        *provenance(
            pairs,
            "alternating fresh processes per batch-shape regime (the setting is process-wide); per "
            "process the total of 8 steps after a warm-up step",
        ),
        "- fixed shapes: every batch 4 x 128; varying shapes: lengths 64-128 changing every step (as padded real data)",
        "- peak RSS per process, reset after the model is built and the warm-up step ran",
        "",
        "| allocator, batches | 8 steps (s), median (min-max) over processes | vs default | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for key, values in runs.items():
        base = statistics.median(s for s, _ in runs[f"default, {key.split(', ')[1]}"])
        med = statistics.median(s for s, _ in values)
        rss = statistics.median(r for _, r in values)
        lines.append(f"| {key} | {spread([s for s, _ in values])} | {med / base:.3f}x | {rss:.0f} |")
    lines.append("")
    for shape in ("fixed", "varying"):
        tuned, default = ([s for s, _ in runs[f"{m}, {shape} shapes"]] for m in ("tuned", "default"))
        if not distinct(tuned, default):
            finding = "no difference beyond the spread (ranges overlap)"
        else:
            finding = "faster" if statistics.median(tuned) < statistics.median(default) else "**slower**"
        lines.append(f"- {shape} shapes, tuned against default: {finding}.")
    write_results("cpu_allocator", lines, runs)


if __name__ == "__main__":
    main()
