"""`distill submit`: a training run as a SLURM job (submitit), or with --local as processes on this machine.

The job runs `distill train`'s trainer with train.resume=auto. On submitit's preemption / time-limit signal the
trainer finishes its step, writes a checkpoint, then hands the signal on to submitit, which requeues the job; the
requeued job resumes from that checkpoint. A requeue that only sends SIGTERM also stops at a step boundary with a
checkpoint, and the restarted job resumes from the latest one.
"""

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from distill.errors import InputError

logger = logging.getLogger(__name__)
SIGTERM_WAIT_S = 600


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


class TrainJob:
    """What a job runs: the trainer on a config, joined to the job's process group. Picklable."""

    def __init__(self, config: Optional[str], overrides: List[str]) -> None:
        self.config, self.overrides = config, list(overrides)

    def __call__(self) -> Dict[str, Any]:
        import submitit

        from distill.engine import distributed
        from distill.engine.train_config import load_train_config
        from distill.engine.trainer import Trainer

        from distill.engine.logs import configure_logging

        configure_logging()
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK for the trainer
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        config = load_train_config(self.config, self.overrides + ["train.resume=auto"])
        trainer = Trainer(config)
        finished = False
        try:
            results = trainer.run()
            finished = True
        finally:
            distributed.shutdown(meet=finished)
        if trainer.stop_signal == signal.SIGTERM and "SLURM_JOB_ID" in os.environ:
            # SLURM requeues (or cancels) with SIGTERM, then SIGKILL: the checkpoint is written; returning now would
            # report a finished job that is about to run again, so wait to be ended, as submitit does
            logger.info("SIGTERM: checkpoint written at step %d; waiting for SLURM to end the job", trainer.step)
            time.sleep(SIGTERM_WAIT_S)
            raise RuntimeError(f"stopped by SIGTERM at step {trainer.step} and not ended by SLURM within "
                               f"{SIGTERM_WAIT_S} s; resubmit to continue from the checkpoint")
        return results

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook: the trainer has saved its checkpoint already; rerun this job."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


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


def submit(config: Optional[str], overrides: List[str], resources: Resources, folder: Optional[str] = None,
           local: bool = False, name: Optional[str] = None):
    """Validate the run's config, then submit it; returns the submitit job."""
    from distill.engine.train_config import load_train_config

    checked = load_train_config(config, overrides)  # a bad key or value stops here, before any submission
    if not local:
        check_cluster(resources)
    root = Path(folder or Path(checked.train.output_dir) / "jobs")
    executor = make_executor(root, resources, local)
    executor.update_parameters(name=name or f"distill-{checked.objective.name}")
    return executor.submit(TrainJob(config, overrides))
