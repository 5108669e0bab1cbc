"""`distill submit`: a training run as a SLURM job (submitit), or with --local as processes on this machine.

The job runs `distill train`'s trainer with train.resume=auto. On submitit's preemption / time-limit signal the
trainer finishes its step, writes a checkpoint, then hands the signal on to submitit, which requeues the job; the
requeued job resumes from that checkpoint. A requeue that only sends SIGTERM also stops at a step boundary with a
checkpoint, and the restarted job resumes from the latest one.
"""

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from distill.errors import InputError
from distill.launch.slurm import Resources, check_cluster, check_local, make_executor, submit_or_explain

logger = logging.getLogger(__name__)
SIGTERM_WAIT_S = 600


class TrainJob:
    """What a job runs: the trainer on a config, joined to the job's process group. Picklable."""

    def __init__(self, config: Optional[str], overrides: List[str]) -> None:
        self.config, self.overrides = config, list(overrides)

    def __call__(self) -> Dict[str, Any]:
        from distill.engine.train_config import load_train_config
        from distill.engine.trainer import run_training
        from distill.launch.slurm import export_task_environment
        from distill.logs import configure_logging

        configure_logging()
        export_task_environment()  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK for the trainer
        trainer = run_training(load_train_config(self.config, self.overrides + ["train.resume=auto"]))
        if trainer.stop_signal == signal.SIGTERM and "SLURM_JOB_ID" in os.environ:
            # SLURM requeues (or cancels) with SIGTERM, then SIGKILL: the checkpoint is written; returning now would
            # report a finished job that is about to run again, so wait to be ended, as submitit does
            logger.info("SIGTERM: checkpoint written at step %d; waiting for SLURM to end the job", trainer.step)
            time.sleep(SIGTERM_WAIT_S)
            raise RuntimeError(f"stopped by SIGTERM at step {trainer.step} and not ended by SLURM within "
                               f"{SIGTERM_WAIT_S} s; resubmit to continue from the checkpoint")
        return trainer.results

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook: the trainer has saved its checkpoint already; rerun this job."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def submit(config: Optional[str], overrides: List[str], resources: Resources, folder: Optional[str] = None,
           local: bool = False, name: Optional[str] = None, check_data: bool = True):
    """Check the run's config, its data paths (check_data=False when they exist only on the compute nodes) and
    the cluster, then submit it; returns the submitit job. Nothing is written or submitted when a check fails."""
    from distill.engine.train_config import check_data_paths, load_train_config

    checked = load_train_config(config, overrides)  # a bad key or value stops here, before any submission
    if check_data:
        check_data_paths(checked)
    check_local(resources) if local else check_cluster(resources)
    root = Path(folder or Path(checked.train.output_dir) / "jobs")
    absent = [p for p in (root, *root.parents) if not p.exists()]
    executor = make_executor(root, resources, local)
    executor.update_parameters(name=name or f"distill-{checked.objective.name}")
    try:
        return submit_or_explain(lambda: executor.submit(TrainJob(config, overrides)), root)
    except InputError:
        for created in absent:  # the folders made for the refused job, innermost first, if they stayed empty
            if created.is_dir() and not any(created.iterdir()):
                created.rmdir()
        raise
