"""Process-level allocator tuning for the ``python -m bench`` command line.

KAN layers allocate several ``[B, in, n_basis]`` tensors of a few MB per step. glibc returns such
blocks to the kernel right after they are freed (they are above its mmap threshold), so every
step page-faults them in again: measured with ``python -m bench perf`` on a 2-core VM, this alone
made a B-spline KAN train step 3.2x slower than a same-size MLP instead of 1.8x. Raising the mmap
and trim thresholds keeps freed blocks in the heap for reuse (what jemalloc/tcmalloc do, which
PyTorch recommends for CPU training). Only the command line does this, never a library import;
set ``BENCH_NO_MALLOPT=1`` to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # 1 GiB: keep freed blocks below this for reuse


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds; True if applied (Linux with glibc only)."""
    if os.environ.get("BENCH_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
