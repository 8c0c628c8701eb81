"""Host-side tuning for training on CPU.

A training step allocates and frees the same large tensors every time (logits and their gradient are ~100 MB for
a 49k vocabulary). With glibc's defaults, freed blocks above the trim / mmap thresholds go back to the operating
system and the next step page-faults them in again, zeroed. Keeping them in the heap made CPU steps 6-21%
faster in our runs, at the price of ~10% more resident memory (benchmarks/results/cpu_allocator.md); the
trainer's `cpu_allocator` setting chooses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 1 GiB in the heap (process-wide, for the rest of the process; Linux
    only). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    settings = ((_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_TOP_PAD, _KEEP_BYTES // 2), (_M_MMAP_THRESHOLD, _KEEP_BYTES))
    return all(mallopt(option, value) == 1 for option, value in settings)
