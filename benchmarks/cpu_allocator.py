"""The CPU allocator setting (`deltatune.train.host.freed_memory_kept`, applied by the CLI) on one LoRA step.

The setting is process-wide and fixed at start, so it cannot be interleaved within one process: fresh processes
alternate default / tuned (A B A B ...), each timing the median of 5 steps after a warm-up (SmolLM2-135M shape,
batch 4 x 128, r=8 q,k,v,o, dropout 0.05, AdamW) and reading its peak RSS. Writes results/cpu_allocator.md.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import distinct, provenance, spread, write_results  # noqa: E402

CHILD = """
import sys, re, statistics, time
sys.path.insert(0, 'benchmarks')
from deltatune.train.host import freed_memory_kept
import lora_step as b
from common import reset_peak_rss
m, loss, opt = b.make_variant('deltatune', 0.05)
if sys.argv[1] == 'tuned':  # as the CLI does: after the model is built, around the steps
    kept = freed_memory_kept()  # keep a reference: a collected context manager would restore the defaults at once
    assert kept.__enter__()
step = b._step_fn(loss, opt)
step()
reset_peak_rss()
times = []
for _ in range(5):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
rss = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024
print(statistics.median(times), rss)
"""


def main(pairs: int = 4) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"default": [], "tuned": []}
    for i in range(pairs):
        for mode in list(runs) if i % 2 == 0 else list(runs)[::-1]:  # alternate which goes first
            out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
            step_s, rss = map(float, out.stdout.split()[-2:])
            runs[mode].append((step_s, rss))
    med = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    rss = {k: statistics.median(r for _, r in v) for k, v in runs.items()}
    lines = [
        "# CPU allocator setting (CLI only): one LoRA step (SmolLM2-135M shape, batch 4 x 128)",
        "",
        *provenance(
            pairs,
            "alternating fresh processes (the setting is process-wide); per process the median of 5 "
            "steps after a warm-up step",
        ),
        "- peak RSS per process, reset after the model is built and the warm-up step ran",
        "",
        "| allocator | step (s), median (min-max) over processes | vs default | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for k, v in runs.items():
        lines.append(f"| {k} | {spread([s for s, _ in v])} | {med[k] / med['default']:.3f}x | {rss[k]:.0f} |")
    steps = {k: [s for s, _ in v] for k, v in runs.items()}
    if not distinct(steps["tuned"], steps["default"]):
        finding = "no difference beyond the spread (ranges overlap)"
    else:
        finding = "faster" if med["tuned"] < med["default"] else "**slower**"
    lines += ["", f"The tuned setting against the default: {finding}."]
    write_results("cpu_allocator", lines, runs)


if __name__ == "__main__":
    main()
