"""`distill-curate cluster --submit local --tasks N`: N tasks, each reading its own shards, give the centroids and
assignments of one process; bad input is one line and status 2, and an earlier result stays as it was; a job
killed after level 1 is rerun and continues from its checkpoint without fitting level 1 again; an interrupted fit
continues from its last saved iteration."""

import shutil
import threading

import numpy as np
import pytest

from data_curation.cli import main
from data_curation.distributed_kmeans import EXIT_AFTER_LEVEL, ClusterState
from data_curation.embeddings import ArrayRows, EmbeddingStore
from data_curation.kmeans import Share, hierarchical_kmeans
from distill.data.filelists import read_paths, write_file_list
from tests.distributed.test_submit import _fake_slurm

# two levels, one resampling step; 64 points per centroid: level 1 is fitted on a sample of 1,536 of the points
SETTINGS = ["--levels", "24", "6", "--iterations", "10", "--resampling-steps", "1", "--per-cluster", "20",
            "--sample-per-centroid", "64"]
RESULTS = ["level1_centroids.npy", "level2_centroids.npy", "level1_assignment.npy", "level2_assignment.npy",
           "distances.npy", "paths.txt", "embeddings.json", "cluster_sizes.png"]


def clustered(n=3000, dim=16, centres=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (c[rng.integers(0, centres, n)] + 0.15 * rng.normal(size=(n, dim))).astype(np.float32)


def make_store(folder, x, shard=500, names=None):
    """float16 shards of `shard` rows, as `embed` writes them."""
    names = names or [f"img{i:05d}.png" for i in range(len(x))]
    store = EmbeddingStore(folder)
    for start in range(0, len(x), shard):
        store.append(x[start : start + shard], names[start : start + shard])
    store.finish()
    return folder


def cluster(store, out, *extra):
    return main(["cluster", "--embeddings", str(store), *SETTINGS, "--output", str(out), *extra])


def assert_same_clustering(a, b):
    for name in ("level1_centroids.npy", "level2_centroids.npy"):
        assert np.allclose(np.load(a / name), np.load(b / name), atol=1e-5), name
    for name in ("level1_assignment.npy", "level2_assignment.npy"):
        assert (np.load(a / name) == np.load(b / name)).all(), name
    assert np.allclose(np.load(a / "distances.npy"), np.load(b / "distances.npy"), atol=1e-5)
    assert read_paths(a / "paths.txt") == read_paths(b / "paths.txt")


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3,000 x 16 points around 12 centres in 6 shards of 500, with rows that `select` leaves out (NaN, zero, a
    repeated path) and a --keep list without 100 of them; and the clustering of one process."""
    folder = tmp_path_factory.mktemp("pool")
    x = clustered()
    x[7] = np.nan
    x[1234] = 0
    names = [f"img{i:05d}.png" for i in range(len(x))]
    names[2500] = names[10]
    store = make_store(folder / "emb", x, names=names)
    keep = folder / "kept.txt"
    write_file_list(keep, [n for i, n in enumerate(names) if i % 30 != 3])
    one = folder / "one"
    assert cluster(store, one, "--keep", str(keep)) == 0
    return {"store": store, "keep": keep, "one": one}


def test_three_local_tasks_give_the_clustering_of_one_process(pool, tmp_path, capsys):
    out = tmp_path / "three"
    assert cluster(pool["store"], out, "--keep", str(pool["keep"]), "--submit", "local", "--tasks", "3",
                   "--wait") == 0
    printed = capsys.readouterr().out
    assert "3 task(s)" in printed and f"2897 images in levels of 24, 6 clusters -> {out}" in printed
    assert_same_clustering(pool["one"], out)
    assert len(read_paths(out / "paths.txt")) == 3000 - 100 - 3  # the keep list less the NaN, zero, repeated rows
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(RESULTS)
    assert not (out / "checkpoint").exists()  # removed once the results are written


def test_bad_input_is_one_line_and_leaves_an_earlier_result_as_it_was(pool, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(pool["one"], out)
    before = files_of(out)

    def refused(*args):
        code = main(["cluster", *SETTINGS, "--output", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("distill-curate cluster: error: "), err
        assert files_of(out) == before and not (out / "checkpoint").exists()
        return err

    three = make_store(tmp_path / "three_shards", clustered(1200), shard=400)
    err = refused("--embeddings", str(three), "--submit", "local", "--tasks", "5")
    assert "--tasks 5 but the store has 3 shards: use at most 3 tasks or re-embed with a smaller --shard-size" in err

    mixed = tmp_path / "mixed"
    make_store(mixed / "part_0000", clustered(600), shard=300)
    make_store(mixed / "part_0001", clustered(600, dim=8), shard=300)
    err = refused("--embeddings", str(mixed), "--submit", "local", "--tasks", "2")
    assert "hold embeddings of different dimensions [8, 16]" in err

    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path / 'bin', partitions='debug')}:/usr/bin:/bin")
    err = refused("--embeddings", str(pool["store"]), "--submit", "slurm", "--tasks", "3", "--partition", "gpu")
    assert "partition 'gpu' does not exist on this cluster: choose one of debug (as `sinfo` lists them)" in err
    invalid = "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2; exit 1"
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path / 'bin2', partitions='gpu', sbatch=invalid)}:/usr/bin:/bin")
    err = refused("--embeddings", str(pool["store"]), "--submit", "slurm", "--tasks", "3", "--partition", "gpu")
    assert "Invalid partition name specified" in err and "--partition 'gpu'" in err and "`sinfo`" in err
    monkeypatch.undo()

    import data_curation.kmeans as kmeans
    import distill.launch.slurm as slurm

    edited = shutil.copytree(pool["store"], tmp_path / "edited")
    real_kmeans, real_submit = kmeans.hierarchical_kmeans, slurm.submit_or_explain

    def embedding_meanwhile(*args, **kwargs):  # `embed` adds a shard while one process clusters
        levels = real_kmeans(*args, **kwargs)
        EmbeddingStore(edited).append(clustered(10, seed=1), [f"new{i}.png" for i in range(10)])
        return levels

    monkeypatch.setattr(kmeans, "hierarchical_kmeans", embedding_meanwhile)
    err = refused("--embeddings", str(edited))
    assert f"{edited} changed while it was being clustered" in err and "nothing was written" in err
    monkeypatch.undo()

    def submitted_then_edited(submit, folder):  # and while a job's tasks start
        job = real_submit(submit, folder)
        EmbeddingStore(edited).append(clustered(10, seed=2), [f"newer{i}.png" for i in range(10)])
        return job

    monkeypatch.setattr(slurm, "submit_or_explain", submitted_then_edited)
    err = refused("--embeddings", str(edited), "--submit", "local", "--tasks", "3", "--wait")
    assert f"{edited} changed since the job was submitted" in err or f"{edited} changed while" in err


def test_a_job_killed_after_level_1_continues_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    store = make_store(tmp_path / "emb", clustered(seed=3))
    streamed = ["--memory-gb", str(100_000 / 2**30)]  # under the 192 kB of float32 rows: read shard by shard
    assert cluster(store, tmp_path / "one", *streamed) == 0
    out = tmp_path / "three"
    command = ["--submit", "local", "--tasks", "3", "--wait", *streamed]
    monkeypatch.setenv(EXIT_AFTER_LEVEL, "1")  # every task ends once level 1 is in the checkpoint
    assert cluster(store, out, *command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ended without its result" in err and "run the same command again" in err
    assert not list(out.glob("level*")) and (out / "checkpoint" / "level1_stage1.npz").is_file()
    saved = np.load(out / "checkpoint" / "level1_stage1.npz")["centroids"]

    monkeypatch.delenv(EXIT_AFTER_LEVEL)
    assert cluster(store, out, *command) == 0
    printed = capsys.readouterr().out
    assert f"continued from the checkpoint in {out}/checkpoint: level 1 stage 1 read back\n" in printed
    assert (np.load(out / "level1_centroids.npy") == saved).all()
    assert_same_clustering(tmp_path / "one", out)


def test_an_interrupted_fit_continues_from_its_last_iteration(tmp_path):
    x = clustered(900, seed=4)
    fit = dict(clusters=[24, 6], iterations=10, resampling_steps=1, per_cluster=20, sample_per_centroid=16)
    whole = hierarchical_kmeans(x, **fit)

    class Interrupted(ClusterState):
        def on_iteration(self, number, stage):
            save = super().on_iteration(number, stage)

            def then_stop(iterations, centroids):
                save(iterations, centroids)
                if (number, stage, iterations) == (1, 0, 4):
                    raise KeyboardInterrupt  # killed during level 2's k-means, after its 4th iteration

            return then_stop

    identity = {"run": 1}
    with pytest.raises(KeyboardInterrupt):
        hierarchical_kmeans(x, **fit, checkpoints=Interrupted(tmp_path / "cp", identity, every_s=0))
    state = ClusterState(tmp_path / "cp", identity, every_s=0)
    assert {k: v for k, v in state.state["fit"].items() if k != "file"} == {"level": 1, "stage": 0, "iterations": 4}
    again = hierarchical_kmeans(x, **fit, checkpoints=state)
    assert state.resumed == ["level 1 stage 1", "level 2 stage 0 iteration 4"]
    for a, b in zip(whole, again):
        assert (a.centroids == b.centroids).all() and (a.assignment == b.assignment).all()
    assert ClusterState(tmp_path / "cp", {"run": 2}).state["stages"] == {}  # another run's checkpoint: afresh


class ThreadGroup:
    """kmeans' collectives between threads standing in for a job's tasks (numpy lets go of the GIL in its products)."""

    gpu_device = None

    def __init__(self, rank, size, slots, barrier):
        self.rank, self.size, self.slots, self.wait = rank, size, slots, barrier.wait

    def _exchange(self, value):
        self.slots[self.rank] = value
        self.wait()
        out = list(self.slots)
        self.wait()
        return out

    def sum(self, array):
        return np.sum(self._exchange(np.array(array)), axis=0).astype(array.dtype)

    def gather(self, value):
        return self._exchange(value)

    def collect(self, value):
        out = self._exchange(value)
        return out if self.rank == 0 else None

    def barrier(self):
        self._exchange(None)


def levels_of_tasks(x, cuts, **fit):
    """hierarchical_kmeans(**fit) run by len(cuts) - 1 threads standing in for a job's tasks, task i holding rows
    cuts[i] .. cuts[i + 1] of x: each task's levels, in rank order."""
    tasks = len(cuts) - 1
    rows = ArrayRows(x)
    slots, barrier, results, failures = [None] * tasks, threading.Barrier(tasks, timeout=120), [None] * tasks, []

    def task(rank):
        try:
            share = Share(rows.slice(cuts[rank], cuts[rank + 1]), cuts[rank], len(x))
            results[rank] = hierarchical_kmeans(share, **fit, group=ThreadGroup(rank, tasks, slots, barrier))
        except BaseException as error:  # reported below
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=task, args=(rank,)) for rank in range(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    return results


@pytest.mark.parametrize("tasks", [2, 3, 5])
def test_tasks_holding_uneven_shares_or_none_of_a_level_give_the_levels_of_one_process(tasks):
    x = clustered(1000, seed=5)
    fit = dict(clusters=[24, 4, 2], iterations=8, resampling_steps=2, per_cluster=5, sample_per_centroid=16)
    one = hierarchical_kmeans(x, **fit)
    cuts = [0, 90, 400, 401, 700, 1000][: tasks] + [1000]  # uneven; with 5 tasks level 3 (4 points) leaves one out
    results = levels_of_tasks(x, cuts, **fit)
    for a, b in zip(one, results[0]):  # rank 0 holds every row of every level
        assert np.allclose(a.centroids, b.centroids, atol=1e-5) and (a.assignment == b.assignment).all()
        assert np.isclose(a.inertia, b.inertia, rtol=1e-6)
    for rank in range(1, tasks):  # the others, their own rows of level 1
        assert (results[rank][0].assignment == one[0].assignment[cuts[rank] : cuts[rank + 1]]).all()
