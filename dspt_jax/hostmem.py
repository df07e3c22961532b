"""glibc malloc settings for a training process: keep freed memory mapped instead of faulting it in again.

XLA:CPU allocates each step's temporaries, and its kernels their scratch buffers, with malloc on its worker
threads, and frees them when the step ends; tf.data does the same for every batch. glibc gives the memory
at the top of each thread arena's heap back to the kernel, so the next step touches fresh pages and takes a
page fault for each. On the README's vectorized sweep (24 runs in one step, 2 CPU cores) that was 5,000 to
9,000 page faults and 11-17 ms of kernel time per step, about 40 ms; with the settings below, 40-80 faults
and 3 ms (docs/SPEED.md). They cost memory that stays mapped: up to `TOP_PAD` per arena, and the process
keeps its peak heap rather than shrinking after it.

`keep_freed_memory()` is called by the command lines (`dspt_jax.main`, `dspt_jax.sweep`) at start, never on
import: a program that imports the library keeps its own allocator settings. A `MALLOC_*` variable in the
environment (glibc's tunables, e.g. `MALLOC_TOP_PAD_`) means the user chose: nothing is changed then. Off
glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

TOP_PAD = 64 << 20  # extra memory a heap grows by, and keeps when it shrinks
MMAP_THRESHOLD = 32 << 20  # glibc's largest automatic value: bigger blocks are still mapped and unmapped
TRIM_THRESHOLD = (1 << 31) - 1  # never give the main heap's top back


def keep_freed_memory(environ=os.environ) -> bool:
    """Sets glibc's malloc to keep freed memory (see the module docstring). True if it did."""
    if any(name.startswith("MALLOC_") for name in environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all([mallopt(param, value) == 1 for param, value in settings])
