"""Keep freed host memory in the process between steps (glibc ``mallopt``).

A CPU training step allocates and frees the same few hundred MB of activations every step. With
glibc's defaults much of it goes back to the kernel on free (heap trimming, and blocks above the
dynamic mmap threshold are unmapped), so the next step faults every page in again and writes into
cold memory: on the 2-core development machine a 64 MB elementwise op into a fresh tensor ran at
8.8 GB/s against 35 GB/s into a reused one. Whole training steps gain less (a few %, most of
their big tensors are reused already): figures in docs/performance.md.

Settings (glibc only; elsewhere nothing changes): blocks up to 32 MB (glibc's largest mmap
threshold) come from the heap, which is never trimmed. The process keeps its peak heap mapped, so
its resident size stays at its peak instead of falling between steps; the peak itself is unchanged.
Hand-written with ``ctypes`` because PyTorch exposes no CPU caching allocator to Python, and
jemalloc / tcmalloc would have to be preloaded before the interpreter starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
_TOP_PAD = 64 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc took all three."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): keep the platform's allocator
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    took = [mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), mallopt(_M_TOP_PAD, _TOP_PAD),
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)]  # c_int: the largest trim threshold it can pass
    return all(r == 1 for r in took)
