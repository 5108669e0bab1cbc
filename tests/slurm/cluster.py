"""A real single-node SLURM cluster on loopback for the tests: munged, slurmctld and slurmd started in the
foreground from a temporary folder (their own config, state, spool, logs and munge socket), torn down by PID.

Two partitions share the node: `debug` (the default) and `urgent`, whose higher PriorityTier preempts `debug`
jobs with REQUEUE, and user signals sent first (preempt_send_user_signal)."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from tests.distributed.ranks import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol")


def available() -> List[str]:
    """The daemons and commands this machine lacks."""
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.processes: Dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname().split(".")[0]

    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.folder / "slurm.conf"))

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        socket_path = f / "munge.socket"
        (f / "slurm.conf").write_text(f"""\
ClusterName=distilltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path},cred_expire=10
CredType=cred/munge
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'log' / 'slurmctld.log'}
SlurmdLogFile={f / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=10
MinJobAge=300
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/none
AccountingStoragePass={socket_path}
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO GraceTime=30
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
""")

    def start(self, timeout: float = 60) -> "Cluster":
        self.stepds_before = set(_pids_named("slurmstepd"))
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        self._write_config()
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.processes["munged"] = subprocess.Popen(
            [_exe("munged"), "-F", "-f", f"--key-file={key}", f"--socket={f / 'munge.socket'}",
             f"--pid-file={f / 'munged.pid'}", f"--log-file={f / 'log' / 'munged.log'}",
             f"--seed-file={f / 'munged.seed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait(lambda: (f / "munge.socket").exists(), timeout, "munged")
        self.processes["slurmctld"] = subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(f / "slurm.conf")],
                                                       env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.processes["slurmd"] = subprocess.Popen([_exe("slurmd"), "-D", "-N", self.node, "-f", str(f / "slurm.conf")],
                                                    env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait(self._node_idle, timeout, "the node to be idle")
        return self

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        return "idle" in out

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}: {self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}: {self.logs()}")

    def run(self, command: List[str], check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr}")
        return done.stdout

    def logs(self) -> str:
        tails = []
        for path in sorted((self.folder / "log").glob("*.log")):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, then end any job step they left behind (by PID)."""
        if self.processes.get("slurmctld") is not None and self.processes["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in set(_pids_named("slurmstepd")) - getattr(self, "stepds_before", set()):
            if _slurm_conf(pid) not in (None, str(self.folder / "slurm.conf")):
                continue  # another cluster's step (a test on another worker): not ours to end
            for victim in descendants(pid) + [pid]:
                try:
                    os.kill(victim, 9)
                except ProcessLookupError:
                    pass


def _slurm_conf(pid: int) -> Optional[str]:
    """The SLURM_CONF a process runs under (a step inherits its slurmd's), or None where it cannot be read."""
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"SLURM_CONF="):
                return item[len(b"SLURM_CONF="):].decode(errors="replace")
    except OSError:
        pass
    return None


def _pids_named(prefix: str) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").startswith(prefix):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _children_table() -> Dict[int, List[int]]:
    """Every live process's children, from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    return children


def children(pid: int) -> List[int]:
    return _children_table().get(pid, [])


def descendants(pid: int) -> List[int]:
    table, out, todo = _children_table(), [], [pid]
    while todo:
        for child in table.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
