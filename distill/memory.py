"""The C allocator's behaviour on Linux: keep freed memory in the heap instead of handing it back to the kernel."""

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed memory, instead of mapping fresh pages
    for every big tensor and unmapping them on free. Training allocates the same large activations every
    step, and a loader worker the same decoded images, crops and their float copies every batch; without this
    each step or batch page-faults them in again (a fault per 4 KiB, each page zeroed by the kernel). Returns
    whether the setting took (False off glibc: macOS, musl)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    if ok:
        logger.debug("glibc malloc keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB)")
    return ok
