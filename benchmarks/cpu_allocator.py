"""The CPU allocator setting (`deltatune.train.host.freed_memory_kept`, applied by the CLI) on one LoRA step.

The setting is process-wide and fixed at start, so it cannot be interleaved within one process: fresh processes
alternate default / tuned (A B A B ...), each timing the median of 5 steps after a warm-up (SmolLM2-135M shape,
batch 4 x 128, r=8 q,k,v,o, dropout 0.05, AdamW) and reading its peak RSS. Writes results/cpu_allocator.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, re, statistics, time
sys.path.insert(0, 'benchmarks')
from deltatune.train.host import freed_memory_kept
import lora_step as b
m, loss, opt = b.make_variant('deltatune', 0.05)
if sys.argv[1] == 'tuned':  # as the CLI does: after the model is built, around the steps
    assert freed_memory_kept().__enter__()
step = b._step_fn(loss, opt)
step()
times = []
for _ in range(5):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
rss = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024
print(statistics.median(times), rss)
"""


def main(pairs: int = 4) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"default": [], "tuned": []}
    for _ in range(pairs):
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
            step_s, rss = map(float, out.stdout.split()[-2:])
            runs[mode].append((step_s, rss))
    med = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    rss = {k: statistics.median(r for _, r in v) for k, v in runs.items()}
    lines = [
        "# CPU allocator setting of the trainer: one LoRA step (SmolLM2-135M shape, batch 4 x 128)",
        "",
        f"{pairs} alternating process pairs; per process the median of 5 steps.",
        "",
        "| allocator | step (s), per process | median | vs default | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for k, v in runs.items():
        each = ", ".join(f"{s:.3f}" for s, _ in v)
        lines.append(f"| {k} | {each} | {med[k]:.3f} | {med[k] / med['default']:.3f}x | {rss[k]:.0f} |")
    out_path = Path(__file__).parent / "results" / "cpu_allocator.md"
    out_path.write_text("\n".join(lines) + "\n")
    out_path.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
