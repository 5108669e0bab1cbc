"""Jobs on SLURM through submitit, or as local processes: the resources a job asks for, a check of the cluster
before anything is submitted, and the executor. Training (`distill submit`) and curation job arrays use them."""

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from distill.errors import InputError


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU (one if no GPU)
    cpus_per_task: int = 8
    timeout_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    comment: Optional[str] = None
    exclusive: bool = False
    mem_gb: Optional[int] = None
    signal_delay_s: int = 120
    max_requeues: int = 10
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def check_cluster(resources: Resources) -> None:
    """A clear error before anything is submitted: no SLURM here, or a partition it does not have."""
    if shutil.which("sbatch") is None:
        raise InputError("no `sbatch` on this machine: submit from a SLURM login node, or run here with --local")
    if resources.partition:
        found = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
        partitions = sorted(set(found.stdout.split()))
        if found.returncode == 0 and resources.partition not in partitions:
            raise InputError(f"partition {resources.partition!r} does not exist on this cluster: choose one of "
                             f"{', '.join(partitions) or '(none listed by sinfo)'}")


def make_executor(folder: Path, resources: Resources, local: bool):
    import submitit

    extra = {} if local else {"slurm_max_num_timeout": resources.max_requeues}  # how often a timed-out job requeues
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="local" if local else "slurm", **extra)
    common = dict(timeout_min=resources.timeout_min, nodes=resources.nodes, tasks_per_node=resources.tasks,
                  gpus_per_node=resources.gpus_per_node, cpus_per_task=resources.cpus_per_task)
    if local:
        executor.update_parameters(timeout_min=resources.timeout_min, tasks_per_node=resources.tasks,
                                   gpus_per_node=resources.gpus_per_node)
        return executor
    slurm = {"slurm_signal_delay_s": resources.signal_delay_s}
    for key in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(resources, key):
            slurm[f"slurm_{key}"] = getattr(resources, key)
    if resources.exclusive:
        slurm["slurm_exclusive"] = True
    if resources.mem_gb:
        common["mem_gb"] = resources.mem_gb
    executor.update_parameters(**common, **slurm, **resources.extra)
    return executor
