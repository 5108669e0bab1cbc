"""Process-level settings: the device, CPU threads, and the C allocator's behaviour on Linux."""

import logging
import math
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from distill.errors import InputError
from distill.memory import keep_freed_memory

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    return torch.device(name)


def _cgroup_cpu_quota() -> Optional[float]:
    """The CPUs the process's cgroup may use (its CPU quota over its period), or None without a quota."""
    try:
        quota, period = (CGROUP_ROOT / "cpu.max").read_text().split()[:2]  # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int((CGROUP_ROOT / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> Tuple[int, str]:
    """The cores this process may actually run on (its CPU affinity, capped by its cgroup's quota), and how that
    was found, for the log."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup quota of {quota:g} CPUs ({affinity} cores in the affinity mask)"
    return affinity, f"{affinity} cores in the affinity mask of {os.cpu_count()}"


def configure_runtime(threads: int, device: torch.device, loader_workers: int = 0) -> int:
    """CPU threads for the step (train.threads, or 0: one per core the process may use; more threads than
    cores make every step wait on the ones descheduled) and the allocator; returns the threads used."""
    if threads:
        torch.set_num_threads(threads)
        logger.info("%d CPU threads (train.threads)", threads)
    else:
        cores, how = available_cores()
        threads = cores
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        logger.info("%d CPU threads: %s%s; set train.threads to change", threads, how,
                    f", besides {loader_workers} loader workers" if loader_workers else "")
    if device.type == "cpu":
        keep_freed_memory()
    return threads
