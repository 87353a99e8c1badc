"""Keep a CPU training process's freed memory in glibc's heap: each step reuses pages instead of faulting in new ones.

PyTorch's CPU allocator takes every tensor from the C library's malloc. With glibc's defaults a training step
hands most of its memory back to the kernel: buffers of 32 MiB or more (the logits of a batch, 8 x 256 x 4,096
floats, are exactly that) are mmap'd and unmapped per tensor, and when the step's activations are freed at the
end of backward the free space at the top of the heap exceeds the trim threshold (at most 64 MiB) and is
released with brk. The next step touches all of it again, one zero-filled page fault per 4 KiB: work that is
not model math and grows with the activations. glibc's mallopt(3) (the M_* parameters are in <malloc.h>;
semantics in the glibc manual, "Memory Allocation Tunables") turns both off for this process:

- M_MMAP_MAX = 0: no allocation is served by its own mmap; large ones come from the heap too and are reused.
- M_TRIM_THRESHOLD = 2 GiB - 1 (the largest int): the heap top is not given back while the process lives.

The cost: the process keeps its peak heap resident until it exits, which a training worker reaches every step
anyway. bench/train_step.py --compare-process measures the gain (docs/benchmarks.md). Only the main arena is
affected in full: threads that allocate on their own arenas keep glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest one, i.e. never trim


def keep_freed_memory() -> bool:
    """Apply the two mallopt settings above; True if they took effect (glibc), False elsewhere (musl, macOS,
    Windows: nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
