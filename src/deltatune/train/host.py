"""Host-side tuning for training on CPU, applied only where deltatune owns the process (the command line).

A training step allocates and frees the same large tensors every time (logits and their gradient are ~100 MB for
a 49k vocabulary). With glibc's defaults, freed blocks above the trim / mmap thresholds go back to the operating
system and the next step page-faults them in again, zeroed. Keeping them in the heap made CPU steps 6-21%
faster in our runs, at the price of ~10% more resident memory (benchmarks/results/cpu_allocator.md).

The setting is process-wide, so the library's `train()` never applies it: a notebook or server calling `train()`
keeps its allocator as it was. The CLI wraps its training loop in `freed_memory_kept()`, which puts glibc's values
back when the loop ends (all of them, or none if applying failed part-way). glibc cannot be asked for its current
values; "back" means its documented defaults, or the `MALLOC_*_` environment values the process started with.
One effect stays: setting the mmap threshold turns off glibc's dynamic adjustment of it for the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_BYTES = 1 << 30
KEEP = {_M_TRIM_THRESHOLD: _KEEP_BYTES, _M_TOP_PAD: _KEEP_BYTES // 2, _M_MMAP_THRESHOLD: _KEEP_BYTES}
_DEFAULTS = {  # mallopt(3): each defaults to 128 KiB, unless the environment set it at start-up
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 128 * 1024),
    _M_TOP_PAD: ("MALLOC_TOP_PAD_", 128 * 1024),
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 128 * 1024),
}


def _glibc_call(function: str, *args: int) -> int | None:
    """glibc's `function(*args)`; None where there is none (not Linux, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        return None


def _mallopt(option: int, value: int) -> bool:
    """glibc's mallopt; False where there is none."""
    return _glibc_call("mallopt", option, value) == 1


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free blocks back to the OS (glibc's malloc_trim), so that what one piece
    of work freed does not count in the next one's resident memory."""
    import gc

    gc.collect()
    _glibc_call("malloc_trim", 0)


def glibc_defaults() -> dict[int, int]:
    """The values `freed_memory_kept` restores."""
    out = {}
    for option, (env, default) in _DEFAULTS.items():
        raw = os.environ.get(env, "")
        out[option] = int(raw) if raw.isdigit() else default
    return out


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed blocks up to 1 GiB in the heap inside the block (yields whether it applied); on exit, or if any
    one setting fails, every setting made is put back."""
    applied: list[int] = []
    try:
        for option, value in KEEP.items():
            if not _mallopt(option, value):
                break
            applied.append(option)
        ok = len(applied) == len(KEEP)
        if not ok:
            _restore(applied)
            applied = []
        yield ok
    finally:
        _restore(applied)


def _restore(options: list[int]) -> None:
    defaults = glibc_defaults()
    for option in options:
        _mallopt(option, defaults[option])
    options.clear()


def wants_kept_memory(setting: str, quantized: bool, on_cpu: bool) -> bool:
    """The `cpu_allocator` run setting: "keep", "default", or "auto" (keep, except for 4-bit runs, which are about
    memory); only ever on CPU."""
    return on_cpu and (setting == "keep" or (setting == "auto" and not quantized))
