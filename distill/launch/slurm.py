"""Jobs on SLURM through submitit, or as local processes: the resources a job asks for, a check of the cluster
before anything is submitted, and the executor. Training (`distill submit`) and curation job arrays use them."""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
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


SLURM_ONLY = ("partition", "account", "qos", "constraint", "comment", "exclusive", "mem_gb")


def check_cluster(resources: Resources) -> None:
    """A clear error before anything is submitted: no SLURM here, a controller that does not answer, or a
    partition it does not have."""
    if shutil.which("sbatch") is None:
        raise InputError("no `sbatch` on this machine: submit from a SLURM login node, or run here with --local")
    try:
        found = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise InputError(f"`sinfo` could not ask SLURM for its partitions ({error}): check that SLURM answers "
                         "here (`sinfo`), or run here with --local") from None
    if found.returncode != 0:
        reason = (found.stderr.strip().splitlines() or [f"exit status {found.returncode}"])[-1]
        raise InputError(f"SLURM's controller does not answer (`sinfo`: {reason}): check that `sinfo` works on this "
                         "machine, or run here with --local")
    partitions = sorted(set(found.stdout.split()))
    if resources.partition and resources.partition not in partitions:
        raise InputError(f"partition {resources.partition!r} does not exist on this cluster: choose one of "
                         f"{', '.join(partitions) or '(none listed by sinfo)'} (as `sinfo` lists them)")


def check_local(resources: Resources) -> None:
    """--local runs on this machine: SLURM options would be ignored, so they are refused."""
    given = [f"--{key.replace('_', '-')}" for key in SLURM_ONLY if getattr(resources, key)]
    if resources.nodes > 1:
        given.append("--nodes")
    if given:
        raise InputError(f"{', '.join(given)} {'is a SLURM option' if len(given) == 1 else 'are SLURM options'}; "
                         "a local job runs on this machine: leave them out, or submit to SLURM")


def submit_or_explain(submit, folder: Path):
    """executor.submit / map_array through `submit()`; a refusal of sbatch becomes one line naming its reason (what
    sbatch wrote to stderr is caught for it, and passed on when the submission succeeds), and the files the failed
    submission left in `folder` are removed."""
    import submitit

    before = set(folder.rglob("*")) if folder.exists() else set()
    printed = io.StringIO()  # submitit prints sbatch's stderr through sys.stderr; sbatch itself writes to fd 2
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            with contextlib.redirect_stderr(printed):
                job = submit()
            error = None
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as failure:
            job, error = None, failure
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = captured.read().decode(errors="replace") + printed.getvalue()
    if error is None:
        if said:
            sys.stderr.write(said)
        return job
    for leftover in sorted(set(folder.rglob("*")) - before, reverse=True):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    lines = [line.strip() for line in said.splitlines() + str(error).splitlines()
             if line.strip()]
    reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no reason given")
    raise InputError(f"SLURM refused the job ({reason[:300]}); nothing was submitted")


def export_task_environment(set_cuda_visible_devices: bool = False) -> int:
    """In a task of a submitit job (SLURM or local): the job's number of tasks; with more than one, the variables
    of a torch.distributed process group exported (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, by
    submitit's TorchDistributedEnvironment), for distill.distributed.init_from_env."""
    import submitit

    environment = submitit.JobEnvironment()
    if environment.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=set_cuda_visible_devices)
    return environment.num_tasks


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
