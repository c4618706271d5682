"""Process-wide performance settings, in one place."""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_cpu_memory() -> bool:
    """Serve large CPU tensors from malloc's heap and keep freed memory there for reuse (glibc; a
    no-op returning False elsewhere).

    By default glibc maps each large block (32 MiB and up, smaller ones until its threshold adapts)
    with mmap and unmaps it on free, so every full-size tensor of every iteration (logits,
    activations, their gradients) page-faults its memory in anew; what that costs, and what this
    setting saves, is measured in docs/performance.md. Results are unchanged (only where memory
    comes from); freed memory stays with the process until it exits, so the resident size stays
    near its peak."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
