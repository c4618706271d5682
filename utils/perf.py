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
    activations, their gradients) page-faults its memory in anew. Measured on a 2-core VM: a fresh
    4x151x128x128 float tensor costs 24 ms of page faults on top of a 10 ms element-wise op, and a
    DRN-D-22 forward + input backward at that size runs 13 % faster with this setting. Results are
    unchanged (only where memory comes from); freed memory stays with the process until it exits,
    so the resident size stays near its peak."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
