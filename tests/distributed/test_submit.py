"""`distill submit`: bad input stops before anything is submitted; --local runs the job as local processes
(two of them train as one process group); a job signalled mid-run writes its checkpoint, is requeued, resumes
and ends with the weights of an uninterrupted run."""

import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.engine.checkpointing import LATEST
from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer
from distill.models import read_checkpoint
from tests.slurm.cluster import children
from tests.tiny_dino import TINY_DINO, tiny_model

TINY = TINY_DINO + [tiny_model(), "data.dataset.limit=256", "data.batch_size=16"]


def _fake_slurm(folder: Path, partitions="debug", sinfo=None, sbatch="echo should-not-be-called >&2; exit 1"):
    """sbatch and sinfo stand-ins: enough for the checks made before submitting."""
    folder.mkdir()
    for name, body in (("sbatch", sbatch), ("sinfo", sinfo or f"echo {partitions}")):
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def test_bad_input_stops_before_submitting(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    assert main(["submit", *TINY, f"train.output_dir={run}", "--partition", "gpu"]) == 2
    assert "no `sbatch` on this machine" in capsys.readouterr().err
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path / 'bin')}:/usr/bin:/bin")
    assert main(["submit", *TINY, f"train.output_dir={run}", "--partition", "gpu"]) == 2
    assert "partition 'gpu' does not exist on this cluster: choose one of debug" in capsys.readouterr().err
    assert main(["submit", *TINY, "train.epochz=3", f"train.output_dir={run}", "--partition", "debug"]) == 2
    assert "epochz" in capsys.readouterr().err
    assert not run.exists()  # nothing was written, nothing submitted


def test_a_cluster_that_does_not_answer_or_refuses_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    no_controller = "echo 'sinfo: error: Unable to contact slurm controller (connect failure)' >&2; exit 1"
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path / 'down', sinfo=no_controller)}:/usr/bin:/bin")
    assert main(["submit", *TINY, f"train.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "controller does not answer" in err and "Unable to contact" in err
    refusing = "echo 'sbatch: error: Batch job submission failed: Invalid account or account/partition' >&2; exit 1"
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path / 'refusing', sbatch=refusing)}:/usr/bin:/bin")
    assert main(["submit", *TINY, f"train.output_dir={run}", "--partition", "debug"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SLURM refused the job" in err and "Invalid account" in err
    assert not run.exists()  # no leftover pickle of the refused job, nor the folders made for it


def test_local_submissions_check_the_data_and_refuse_slurm_options(tmp_path, capsys):
    run = tmp_path / "run"
    missing = ["data.dataset.kind=folder", f"data.dataset.path={tmp_path / 'nowhere'}"]
    assert main(["submit", *TINY, *missing, f"train.output_dir={run}", "--local"]) == 2
    assert f"data.dataset.path {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert main(["submit", *TINY, f"train.output_dir={run}", "--local", "--partition", "gpu"]) == 2
    assert "--partition is a SLURM option; a local job runs on this machine" in capsys.readouterr().err
    assert not run.exists()


def test_local_job_with_two_tasks_trains_as_one_process_group(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["submit", *TINY, "train.max_steps=4", f"train.output_dir={run}", "--local", "--tasks-per-node",
                 "2", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted job" in out and "local processes, 1 node(s) x 2 task(s)" in out
    state = read_checkpoint(run / LATEST)
    assert state["step"] == 4 and state["steps_per_epoch"] == 256 // (16 * 2)  # two ranks share each step
    assert len(list((run / "jobs").glob("*/*_1_log.out"))) == 1  # the second task's log


@pytest.mark.timeout(600)
def test_a_signalled_job_checkpoints_requeues_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    steps = ["train.epochs=8", "optim.warmup_epochs=1", "data.dataset.limit=512"]  # 256 steps
    Trainer(load_train_config(None, TINY + steps + [f"train.output_dir={tmp_path / 'straight'}"])).run()

    from distill.launch.submit import Resources, submit

    run = tmp_path / "signalled"
    job = submit(None, TINY + steps + [f"train.output_dir={run}"], Resources(tasks_per_node=1, timeout_min=30),
                 local=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until it is training, then signal it as SLURM would
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.2)
    tasks = children(job._process.pid)
    assert tasks, "the job's task process was not found"
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)  # submitit's preemption / time-limit signal
    job.results()
    log = (run / "train.log").read_text()
    assert "stopped at step" in log and "signal SIGUSR2" in log and "resumed from" in log
    a, b = read_checkpoint(tmp_path / "straight" / LATEST), read_checkpoint(run / LATEST)
    assert a["step"] == b["step"] == 256
    for key, value in a["objective"].items():
        assert torch.allclose(value, b["objective"][key], rtol=1e-5, atol=1e-6), key
