"""Keep freed memory in the process instead of handing it back to the OS after every step (glibc).

Each training step frees and re-allocates the same large buffers; the largest is the word-embedding
gradient, dense and vocab x d floats (47 MB for MiniLM, 94 MB for MPNet). glibc serves blocks over its
mmap threshold (at most 32 MB by default) with fresh mmaps and returns them on free, so every step
faults those pages in again: 12,000-20,000 page faults a step on the MiniLM student, 300-500 with this
(5-10 % of a 2-core CPU step; docs/PERFORMANCE.md). Raising the mmap and trim thresholds keeps the memory
for the next step, as the jemalloc / tcmalloc setups of CPU-training guides do. The cost: freed memory
stays with the process (RSS after 50 MiniLM steps: 2,325 MiB against 2,264 MiB without).

    keep_freed_memory()      # once, at start-up; False (nothing done) where libc is not glibc
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt(3) parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Serve blocks below `limit` bytes from the heap, and keep up to `limit` freed bytes at its top."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))
