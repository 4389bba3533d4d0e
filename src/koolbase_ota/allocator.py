"""The C allocator's settings for a server process: freed buffers are reused, not re-faulted.

An upload passes its bytes through buffers of up to a MiB: each socket read (1 MiB once the body
is seen to be large), each piece the HTTP parser copies out, the zip check's reads.
glibc serves blocks that size with an mmap(2) of their own at first, and later from the top of
the heap, which it gives back to the kernel as soon as twice the block size is free there. Either
way every block is fresh memory, and every fresh page costs a page fault on first touch: about
5,000 for a 50 MiB upload, some 0.03 s of its 0.2 s here. With both thresholds raised, a freed
block is simply reused by the next.

The cost is memory that stays with the process after a burst of uploads: up to
`TRIM_THRESHOLD_BYTES` of free heap is kept instead of given back, for each of the process's
allocator arenas (glibc gives busy threads arenas of their own, up to 8 per core;
`MALLOC_ARENA_MAX` bounds them).
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

#: glibc's `mallopt` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks smaller than this come from the heap rather than an mmap(2) of their own.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse before the rest is given back.
TRIM_THRESHOLD_BYTES = 8 * 1024 * 1024


#: How an operator sets these thresholds themselves: glibc's environment variables, and its
#: tunables (`GLIBC_TUNABLES=glibc.malloc.trim_threshold=...`).
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPERATOR_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def _operator_chose() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in OPERATOR_VARIABLES) or any(
        name in tunables for name in OPERATOR_TUNABLES
    )


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; True when they were set.

    Nothing is changed off glibc (musl's and macOS's allocators have no such thresholds), or
    when the operator set either threshold: theirs wins.
    """
    if _operator_chose():
        return False
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either fixes both (glibc stops adjusting them itself), so both are set; each
    # on its own (a 32-bit glibc refuses an mmap threshold over 512 KiB).
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    trim_set = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not (mmap_set and trim_set):
        logger.info("the allocator refused a threshold; uploads may be slower")
    return mmap_set and trim_set
