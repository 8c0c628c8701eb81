"""Shared benchmark helpers: the SmolLM2-shaped model, interleaved timing, saved-activation accounting."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# SmolLM2-135M's shape (LLaMA architecture); random init keeps the benchmark independent of the download.
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)


def smollm2_shaped(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).train()


def step_allocator(model: nn.Module) -> Callable[[], None]:
    """Calls the model's per-step hook with a running step count (AdaLoRA's allocation: deltatune has it on the
    PeftModel, a no-op for other methods; peft on its AdaLoRA tuner only)."""
    allocate = getattr(model, "update_and_allocate", None) or getattr(model.base_model, "update_and_allocate", None)
    steps = iter(range(10**9))

    def run() -> None:
        if allocate is not None:
            allocate(next(steps))

    return run


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each fn once per round, in turn, so machine noise hits every variant alike; the order rotates every
    round (no variant always runs first, after the same neighbour); seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def saved_activation_bytes(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward during `step()` (which returns a loss)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


# -- provenance: every results file says what was measured, on what, how often, and how much it varied -----------


def provenance(rounds: int, what: str) -> list[str]:
    """Markdown lines: commit (with a mark when the tree had uncommitted changes), library versions, machine,
    rounds and how they were ordered."""
    import datetime
    import importlib.metadata
    import os
    import platform
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    # results files being rewritten by this very run do not count as a change to what is measured
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    dirty = " (uncommitted changes)" if changed else ""
    versions = []
    for package in ("deltatune", "torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    note = os.environ.get("DELTATUNE_MACHINE_NOTE")  # set by scripts/slow_machine.sh
    return [
        f"- commit {commit}{dirty}, {datetime.date.today().isoformat()}; regenerate with `make bench`",
        f"- {', '.join(versions)}; Python {platform.python_version()}",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        + (f"; **{note}**" if note else ""),
        f"- {what}: {rounds} rounds, the variants' order rotated every round; spread = min-max over rounds",
    ]


def spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    """median (min-max)."""
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def distinct(a: list[float], b: list[float]) -> bool:
    """True when the two samples' ranges do not overlap: only then is a difference reported as one."""
    return max(a) < min(b) or max(b) < min(a)


def verdict(met: bool) -> str:
    return "met" if met else "**MISSED**"


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: `clear_refs` 5), so a peak read later excludes warm-up and loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident memory since start or the last `reset_peak_rss` (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_results(name: str, lines: list[str], data: dict) -> Path:
    """results/<name>.md and results/<name>.json."""
    import json

    out = Path(__file__).parent / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    print(out.read_text())
    return out


def round_ratios(a: list[float], b: list[float]) -> str:
    """a / b per round (both interleaved in the same rounds): "median (min-max)"."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"


def peak_rss_mb(setup: str, step: str, steps: int = 3) -> float:
    """Peak RSS (Linux VmHWM, MiB) of a fresh Python process (cwd: the repo, `benchmarks` importable) over `steps`
    calls of `step` after `setup` ran and one warm-up call; the peak is reset after the warm-up (clear_refs), so
    building the model does not hide the step."""
    import subprocess
    import sys

    code = (
        f"import sys, re; sys.path.insert(0, 'benchmarks'); {setup}; {step}; "
        f"open('/proc/self/clear_refs', 'w').write('5'); [{step} for _ in range({steps})]; "
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
