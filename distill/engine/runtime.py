"""Process-level settings: the device, CPU threads, and the C allocator's behaviour on Linux."""

import ctypes
import ctypes.util
import functools
import logging

import torch

from distill.errors import InputError

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed memory, instead of mapping fresh pages
    for every big tensor and unmapping them on free. Training allocates the same large activations every
    step; without this each step page-faults them in again. Returns whether the setting took."""
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


def configure_runtime(threads: int, device: torch.device) -> None:
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_freed_memory()
