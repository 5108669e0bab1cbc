"""`distill submit` on a real single-node SLURM cluster brought up on loopback (tests/slurm/cluster.py): a DINO
job signalled mid-run (submitit's USR2), then requeued with SIGTERM only, resumes each time and ends with the
weights of an uninterrupted run; a job preempted by a higher-tier partition's job requeues and finishes; a 2-task
job trains over gloo as one process group; a job array embeds one part per task; a k-means job of several tasks
clusters as one process does; a dedup job array gives the kept list and groups of one process."""

import json
import os
import time

import pytest
import torch

from distill.data.filelists import read_paths
from distill.engine.checkpointing import LATEST
from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer
from distill.launch.submit import Resources, submit
from distill.models import read_checkpoint
from tests.slurm.cluster import Cluster, available
from tests.tiny_dino import TINY_DINO, tiny_model

# Every test here on one pytest-xdist worker, named explicitly: a cluster's teardown ends the job steps started
# since it began (by PID, whichever cluster they belong to), so a second cluster on another worker would lose its
# jobs mid-run.
pytestmark = pytest.mark.xdist_group("slurm")

TINY = TINY_DINO + [tiny_model(), "data.batch_size=16", "optim.warmup_epochs=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = available()
    assert not missing, (f"SLURM is not installed here ({', '.join(missing)} missing): `make test` installs "
                         "munge, slurmctld, slurmd and slurm-client with tools/get_slurm.sh (needs root or sudo)")
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def _wait(condition, timeout, what, cluster):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout} s for {what}\nsqueue: {cluster.run(['squeue'], check=False)}\n"
                       f"{cluster.logs()}")


def _steps(run):
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _job_state(cluster, job_id):
    out = cluster.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False).strip()
    return out or "GONE"


@pytest.mark.timeout(900)
def test_a_slurm_job_signalled_then_requeued_resumes_each_time_and_ends_like_an_uninterrupted_run(
        cluster, tmp_path, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    steps = ["train.epochs=8", "data.dataset.limit=1024"]  # 64 steps an epoch, 512 in all
    Trainer(load_train_config(None, TINY + steps + [f"train.output_dir={tmp_path / 'straight'}"])).run()

    run = tmp_path / "signalled"
    job = submit(None, TINY + steps + [f"train.output_dir={run}"],
                 Resources(partition="debug", timeout_min=30, cpus_per_task=1, signal_delay_s=30),
                 folder=str(tmp_path / "jobs"))
    _wait(lambda: _steps(run) >= 40, 300, "the job to train", cluster)
    job._interrupt()  # submitit's preemption signal (USR2), as a time limit or preemption sends it
    _wait(lambda: "resumed from" in (run / "train.log").read_text(), 300, "the requeued job to resume", cluster)
    first = (run / "train.log").read_text().count("resumed from")
    _wait(lambda: _steps(run) >= 40 + 150, 300, "more training", cluster)
    cluster.run(["scontrol", "requeue", str(job.job_id)])  # SIGTERM only, then the job runs again
    _wait(lambda: (run / "train.log").read_text().count("resumed from") > first, 300,
          "the job to resume after the SIGTERM requeue", cluster)
    _wait(lambda: (run / "results.json").is_file() and _job_state(cluster, job.job_id) == "GONE", 600,
          "the job to finish", cluster)
    log = (run / "train.log").read_text()
    assert "handing SIGUSR2 on to the launcher" in log and log.count("resumed from") >= 2
    a, b = read_checkpoint(tmp_path / "straight" / LATEST), read_checkpoint(run / LATEST)
    assert a["step"] == b["step"] == 512
    for key, value in a["objective"].items():
        assert torch.allclose(value, b["objective"][key], rtol=1e-5, atol=1e-6), key


@pytest.mark.timeout(600)
def test_a_two_task_slurm_job_trains_over_gloo(cluster, tmp_path, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "two"
    job = submit(None, TINY + ["data.dataset.limit=256", "train.max_steps=4", f"train.output_dir={run}"],
                 Resources(partition="debug", timeout_min=30, tasks_per_node=2, cpus_per_task=1),
                 folder=str(tmp_path / "jobs"))
    _wait(lambda: (run / "results.json").is_file() and _job_state(cluster, job.job_id) == "GONE", 300,
          "the 2-task job", cluster)
    state = read_checkpoint(run / LATEST)
    assert state["step"] == 4 and state["steps_per_epoch"] == 256 // (16 * 2)
    assert len(list((tmp_path / "jobs").glob(f"{job.job_id}/*_1_log.out"))) == 1


@pytest.mark.timeout(600)
def test_a_job_array_embeds_one_part_per_task_and_the_next_step_reads_them_as_one(cluster, tmp_path, monkeypatch):
    from data_curation.cli import main as curate
    from data_curation.embeddings import EmbeddingStore

    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    emb = tmp_path / "emb"
    assert curate(["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--limit", "300",
                   "--shard-size", "64", "--parts", "3", "--submit", "slurm", "--partition", "debug",
                   "--cpus-per-task", "1", "--timeout", "30", "--output", str(emb), "--wait"]) == 0
    store = EmbeddingStore(emb)
    assert [p.folder.name for p in store.parts()] == ["part_0000", "part_0001", "part_0002"]
    assert len(store) == 300 and store.paths() == [f"fashion_mnist/train/{i}" for i in range(300)]
    assert curate(["dedup", "--embeddings", str(emb), "--threshold", "0.999", "--output", str(tmp_path / "dd")]) == 0
    kept = read_paths(tmp_path / "dd" / "kept.txt")
    groups = json.loads((tmp_path / "dd" / "groups.json").read_text())
    assert len(kept) + sum(len(g) - 1 for g in groups) == 300  # every row of every part was read


@pytest.mark.timeout(600)
def test_a_cluster_job_of_several_tasks_gives_the_clustering_of_one_process(cluster, tmp_path, monkeypatch):
    from data_curation.cli import main as curate
    from tests.curation.test_distributed_kmeans import SETTINGS, assert_same_clustering, clustered, make_store

    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    store = make_store(tmp_path / "emb", clustered())  # 6 shards
    common = ["cluster", "--embeddings", str(store), *SETTINGS]
    assert curate(common + ["--output", str(tmp_path / "one")]) == 0
    tasks = min(3, os.cpu_count() or 1)  # one CPU each: the node has this machine's CPUs
    assert curate(common + ["--output", str(tmp_path / "job"), "--submit", "slurm", "--partition", "debug",
                            "--tasks", str(tasks), "--cpus-per-task", "1", "--timeout", "30", "--wait"]) == 0
    assert_same_clustering(tmp_path / "one", tmp_path / "job")
    assert len(list((tmp_path / "job" / "jobs").glob(f"*/*_{tasks - 1}_log.out"))) == 1  # tasks ran as one job
    assert not (tmp_path / "job" / "checkpoint").exists()


@pytest.mark.timeout(600)
def test_a_dedup_job_array_gives_the_kept_list_and_groups_of_one_process(cluster, tmp_path, monkeypatch):
    from data_curation.cli import main as curate
    from tests.curation.test_distributed_kmeans import make_store
    from tests.curation.test_sharded_dedup import pool_with_copies

    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    store = make_store(tmp_path / "emb", pool_with_copies(), shard=150)
    common = ["dedup", "--embeddings", str(store), "--threshold", "0.95", "--no-grid"]
    assert curate(common + ["--output", str(tmp_path / "one")]) == 0
    assert curate(common + ["--output", str(tmp_path / "job"), "--submit", "slurm", "--partition", "debug",
                            "--parts", "3", "--cpus-per-task", "1", "--timeout", "30", "--wait"]) == 0
    for name in ("kept.txt", "groups.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "job" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "job" / "parts").glob("done_*")) == [f"done_{i:04d}" for i in range(3)]


@pytest.mark.timeout(900)
def test_a_job_preempted_by_a_higher_tier_partition_requeues_and_resumes(cluster, tmp_path, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    steps = ["train.epochs=8", "data.dataset.limit=1024"]
    run = tmp_path / "preempted"
    cpus = os.cpu_count() or 2
    job = submit(None, TINY + steps + [f"train.output_dir={run}"],
                 Resources(partition="debug", timeout_min=30, cpus_per_task=cpus, signal_delay_s=30),
                 folder=str(tmp_path / "jobs"))
    _wait(lambda: _steps(run) >= 40, 300, "the job to train", cluster)
    urgent = cluster.run(["sbatch", "--parsable", "-p", "urgent", "-c", str(cpus), "-o", str(tmp_path / "urgent.out"),
                          "--wrap", "sleep 3"]).strip()
    _wait(lambda: "resumed from" in (run / "train.log").read_text(), 400, "the preempted job to resume", cluster)
    _wait(lambda: (run / "results.json").is_file() and _job_state(cluster, job.job_id) == "GONE", 600,
          "the job to finish", cluster)
    assert _job_state(cluster, urgent) == "GONE" and (tmp_path / "urgent.out").is_file()
    log = (run / "train.log").read_text()
    assert "handing SIGUSR2 on to the launcher" in log  # SLURM's preemption sent the job's user signal first
    assert read_checkpoint(run / LATEST)["step"] == 512
