"""`distill-curate cluster` over the tasks of a job: each task reads its own shards of the store, assigns its rows
and adds its per-centroid sums and counts to the other tasks' (torch.distributed: gloo on CPUs, NCCL with --gpu)
at every iteration of kmeans.hierarchical_kmeans, which one process runs with the same code and the same draws,
so that N tasks give the centroids and assignments of one process. Rank 0 keeps a checkpoint of the finished
stages (and, every few minutes, of the running fit) in OUT/checkpoint: a requeued or rerun job continues from it.
Rank 0 writes the results, each file whole, once everything is computed and the store is found unchanged;
`write_clusters` writes them for one process too.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_curation.embeddings import (MANIFEST, EmbeddingStore, contiguous_runs, file_digest, keep_forms, report_missing_kept,
                                      rows_in_memory_or_streamed, usable_rows, valid_mask)
from data_curation.kmeans import ALONE, Checkpoints, Level, Share, hierarchical_kmeans, leaf_of_top
from data_curation.pictures import cluster_sizes
from distill.data.filelists import readable_name, write_file_list
from distill.errors import DistillError, InputError
from distill.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

EMBEDDINGS_RECORD = "embeddings.json"
CHECKPOINT = "checkpoint"
FIT_EVERY_S = 120.0  # how often a running fit's centroids are written (finished stages always are)
# for the tests: every task ends, as a killed job would, once level N (1-based) is in the checkpoint
EXIT_AFTER_LEVEL = "DISTILL_CURATE_CLUSTER_EXIT_AFTER_LEVEL"


def manifest_digest(store: EmbeddingStore) -> str:
    """sha256 of a store's manifest file (or of its parts' manifests, in order): a shard added or a part rewritten
    changes it."""
    files = [store.folder / MANIFEST] if (store.folder / MANIFEST).is_file() else \
        [part.folder / MANIFEST for part in store.parts()]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(store.folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_tasks(shards: int, tasks: int) -> None:
    if tasks < 1:
        raise InputError(f"--tasks {tasks}: give at least 1")
    if tasks > shards:
        raise InputError(f"--tasks {tasks} but the store has {shards} shard{'s' if shards != 1 else ''}: use at most "
                         f"{shards} task{'s' if shards != 1 else ''} or re-embed with a smaller --shard-size")


@dataclass
class ClusterSettings:
    """What `cluster` was asked for (picklable, for the job)."""

    embeddings: str
    output: str
    levels: List[int]
    iterations: int = 20
    resampling_steps: int = 1
    per_cluster: int = 10
    sample_per_centroid: int = 256
    seed: int = 0
    memory_gb: float = 8.0
    keep: Optional[str] = None
    gpu: bool = False
    fit: str = "lloyd"

    def identity(self) -> Dict[str, Any]:
        """Everything that decides the result, for telling whether a checkpoint belongs to this run."""
        out = {k: v for k, v in asdict(self).items() if k not in ("output", "gpu")}
        if self.fit == "lloyd":  # as before `fit` existed: a checkpoint written then still continues
            del out["fit"]
        out["embeddings"] = os.path.abspath(self.embeddings)
        out["keep"] = None if self.keep is None else [os.path.abspath(self.keep), file_digest(self.keep)]
        return out


# ---------------------------------------------------------------------------------------------- the collectives


class TaskGroup:
    """kmeans' collectives over the process group of a job's tasks (distill.distributed)."""

    def __init__(self, gpu_device: Optional[int] = None) -> None:
        import torch
        import torch.distributed as dist

        from distill import distributed

        self.distributed, self.dist = distributed, dist
        self.rank, self.size = distributed.rank(), distributed.world_size()
        self.device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        self.gpu_device = gpu_device

    def sum(self, array: np.ndarray) -> np.ndarray:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        self.distributed.all_reduce_sum(tensor)
        return tensor.cpu().numpy()

    def gather(self, value) -> list:
        return self.distributed.gather_objects(value)

    def collect(self, value) -> Optional[list]:
        out = [None] * self.size if self.rank == 0 else None
        self.dist.gather_object(value, out, dst=0)
        return out

    def barrier(self) -> None:
        self.distributed.barrier()


def agree(group, value, error: Optional[str]) -> list:
    """Every task's value, once every task has said whether its part went well: the first error (in rank order)
    stops every task with the same message, so that none waits for the others in a collective."""
    found = group.gather((value, error))
    errors = [e for _, e in found if e]
    if errors:
        raise InputError(errors[0])
    return [v for v, _ in found]


def _os_error(error: OSError) -> str:
    return f"{readable_name(str(error.filename))}: {error.strerror or error}" if error.filename else str(error)


def _attempt(work):
    """(work(), None), or (None, the message) of bad input or a file that cannot be read."""
    try:
        return work(), None
    except DistillError as error:
        return None, str(error)
    except OSError as error:
        return None, _os_error(error)


# ------------------------------------------------------------------------------------------- each task's rows


def select_share(settings: ClusterSettings, digest: str, group=ALONE) -> Tuple[Share, Optional[List[str]]]:
    """This task's Share of the usable rows of the store (its shards), chosen as `select` chooses them (the same
    rows, the same float32 values, held in memory or streamed by the same rule, over the whole selection); and on
    rank 0 the paths of all of them. Any task's bad input stops every task."""
    store = EmbeddingStore(settings.embeddings)
    name = readable_name(settings.embeddings)

    def scan():
        if manifest_digest(store) != digest:
            raise InputError(f"{name} changed since the job was submitted (its manifest is not the one read then): "
                             "submit again once the store is no longer being written")
        manifest = store.manifest()
        shards, dim = manifest["shards"], store.dim
        check_tasks(len(shards), group.size)
        first, stop = contiguous_runs(len(shards), group.size)[group.rank]  # each task's shards
        bounds = np.cumsum([0] + [s["rows"] for s in shards])
        # select reads a store that fits whole into memory; this task reads its shards, one at a time
        fits = bounds[-1] * dim * 4 <= settings.memory_gb * 2**30
        loaded = np.empty((bounds[stop] - bounds[first], dim), dtype=np.float32) if fits else None
        valid = np.zeros(bounds[stop] - bounds[first], dtype=bool)
        for number in range(first, stop):
            shard = np.asarray(store.open_shard(shards[number], dim), dtype=np.float32)
            at = slice(bounds[number] - bounds[first], bounds[number + 1] - bounds[first])
            valid[at] = valid_mask(shard)
            if fits:
                loaded[at] = shard
        if not manifest["complete"] and group.rank == 0:
            logger.warning("%s is not complete (%d embeddings so far): rerun `distill-curate embed` to finish it; "
                           "using what is there", name, int(bounds[-1]))
        return (int(bounds[first]), int(bounds[stop]), loaded), valid

    scanned, error = _attempt(scan)
    valid = np.concatenate(agree(group, None if scanned is None else scanned[1], error))
    lo, hi, loaded = scanned[0]

    def choose():
        paths = store.paths()
        if len(paths) != len(valid):
            raise InputError(f"{name}: its paths files list {len(paths)} paths for {len(valid)} embeddings; re-run "
                             "`distill-curate embed` into a new folder")
        forms = keep_forms(settings.keep) if settings.keep else None
        rows = usable_rows(paths, valid, None if forms is None else [n for names in forms for n in names], name)
        chosen = [paths[i] for i in rows]
        if forms is not None:
            report_missing_kept(forms, chosen, settings.keep, settings.embeddings)
        mask = np.zeros(len(valid), dtype=bool)
        mask[rows] = True
        return mask, chosen

    picked, error = _attempt(choose) if group.rank == 0 else ((None, None), None)
    rows = np.flatnonzero(agree(group, None if picked is None else picked[0], error)[0])
    mine = rows[(rows >= lo) & (rows < hi)]
    local = rows_in_memory_or_streamed(store, mine, settings.memory_gb, loaded, first_row=lo, total=len(rows))
    return Share(local, int(np.searchsorted(rows, lo)), len(rows)), (picked[1] if group.rank == 0 else None)


# ------------------------------------------------------------------------------------------------ checkpoints


class ClusterState(Checkpoints):
    """The checkpoint of a clustering in OUT/checkpoint: state.json (what the run is: settings and the store's
    manifest digest; the last stage done of each level; an interrupted fit), beside it one .npz per stage
    (centroids, and the assignment and distance of every row) and one for the running fit's centroids. Rank 0
    writes (each file whole, state.json last: it names only files already there); every task reads. A checkpoint
    of another run (other settings, another state of the store) is removed and the run starts afresh."""

    def __init__(self, folder: Path, identity: Dict[str, Any], group=ALONE, every_s: float = FIT_EVERY_S) -> None:
        self.folder, self.identity, self.group, self.every_s = Path(folder), identity, group, every_s
        self.resumed: List[str] = []
        self.last_fit = time.monotonic()
        state = None
        if group.rank == 0:
            state = self._read()
            if state is not None and state.get("identity") != identity:
                logger.info("%s holds the checkpoint of another clustering (other settings or another state of the "
                            "store): starting afresh", readable_name(str(self.folder)))
                state = None
            if state is None:
                self.remove()
                state = {"identity": identity, "stages": {}, "fit": None}
        self.state = group.gather(state)[0]  # rank 0's reading, for every task

    def _read(self) -> Optional[dict]:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def _commit(self, stale: Sequence[str] = ()) -> None:
        atomic_write_text(self.folder / "state.json", json.dumps(self.state, indent=1))
        for name in stale:
            (self.folder / name).unlink(missing_ok=True)

    def _save_npz(self, name: str, **arrays) -> None:
        atomic_write(self.folder / name, lambda handle: np.savez(handle, **arrays))

    def stage(self, number: int):
        entry = self.state["stages"].get(str(number))
        if entry is None:
            return None
        with np.load(self.folder / entry["file"]) as saved:
            level = Level(saved["centroids"], saved["assignment"], saved["distances"], float(saved["inertia"]))
        self.resumed.append(f"level {number + 1} stage {entry['stage']}")
        if self.group.rank == 0:
            logger.info("level %d: stage %d read back from %s", number + 1, entry["stage"],
                        readable_name(str(self.folder)))
        return entry["stage"], level

    def fit(self, number: int, stage: int):
        fit = self.state.get("fit")
        if not fit or (fit["level"], fit["stage"]) != (number, stage):
            return None
        with np.load(self.folder / fit["file"]) as saved:
            centroids = saved["centroids"]
        if self.group.rank == 0:
            logger.info("level %d stage %d: continuing the fit after iteration %d", number + 1, stage,
                        fit["iterations"])
        self.resumed.append(f"level {number + 1} stage {stage} iteration {fit['iterations']}")
        return fit["iterations"], centroids

    def on_iteration(self, number: int, stage: int):
        if self.group.rank != 0:
            return None

        def save(iterations: int, centroids: np.ndarray) -> None:
            if time.monotonic() - self.last_fit < self.every_s:
                return
            old = (self.state.get("fit") or {}).get("file")
            name = f"fit_level{number + 1}_stage{stage}_{iterations}.npz"
            self._save_npz(name, centroids=centroids)
            self.state["fit"] = {"level": number, "stage": stage, "iterations": iterations, "file": name}
            self._commit([old] if old and old != name else [])
            self.last_fit = time.monotonic()

        return save

    def save(self, number: int, stage: int, level: Optional[Level], last: bool) -> None:
        if self.group.rank == 0:
            old = [entry["file"] for entry in [self.state["stages"].get(str(number))] if entry]
            old += [self.state["fit"]["file"]] if self.state.get("fit") else []
            name = f"level{number + 1}_stage{stage}.npz"
            self._save_npz(name, centroids=level.centroids, assignment=level.assignment, distances=level.distances,
                           inertia=np.float64(level.inertia))
            self.state["stages"][str(number)] = {"stage": stage, "file": name}
            self.state["fit"] = None
            self._commit([f for f in old if f != name])
            self.last_fit = time.monotonic()
        if last and os.environ.get(EXIT_AFTER_LEVEL) == str(number + 1):
            self.group.barrier()  # rank 0 has written the level
            logger.warning("%s=%d: ending here, as a killed job would", EXIT_AFTER_LEVEL, number + 1)
            os._exit(3)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------------- results


class StoreChanged(InputError):
    """The store's manifest changed between the start of a clustering and the writing of its results."""


def write_clusters(out, levels: List[Level], paths: List[str], embeddings: str, digest: str,
                   level_sizes: Sequence[int]) -> Dict[str, Any]:
    """The files of `cluster` (levelN_centroids.npy, levelN_assignment.npy for every level, distances.npy,
    paths.txt, embeddings.json, cluster_sizes.png), each written whole beside its place, then all renamed into
    it; not one when the store's manifest is no longer the one read at the start (digest). Returns the figures
    of the summary line."""
    store = EmbeddingStore(embeddings)
    if manifest_digest(store) != digest:
        raise StoreChanged(f"{readable_name(embeddings)} changed while it was being clustered (its manifest is not the "
                         "one read at the start): nothing was written; cluster again once the store is no longer "
                         "being written")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: Dict[str, Any] = {}
    for number, (level, assignment) in enumerate(zip(levels, leaf_of_top(levels)), start=1):
        files[f"level{number}_centroids.npy"] = level.centroids
        files[f"level{number}_assignment.npy"] = assignment
    files["distances.npy"] = levels[0].distances
    temporary: List[Tuple[Path, Path]] = []
    try:
        for name, array in files.items():
            target = out / name
            staged = out / f".{name}.{os.getpid()}.incoming.npy"
            np.save(staged, array)
            temporary.append((staged, target))
        staged = out / f".paths.txt.{os.getpid()}.incoming"
        write_file_list(staged, paths)
        temporary.append((staged, out / "paths.txt"))
        staged = out / f".{EMBEDDINGS_RECORD}.{os.getpid()}.incoming"
        # what the clusters are of: retrieve --clusters checks its seed set against it
        staged.write_text(json.dumps({"embeddings": os.path.abspath(embeddings), "dim": store.dim,
                                      "source": store.source}, indent=1))
        temporary.append((staged, out / EMBEDDINGS_RECORD))
        sizes = np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))
        staged = out / f".cluster_sizes.{os.getpid()}.incoming.png"
        cluster_sizes(staged, sizes, title=f"{len(paths)} images in {len(sizes)} clusters")
        temporary.append((staged, out / "cluster_sizes.png"))
        for staged, _ in temporary:
            with open(staged, "rb") as handle:
                os.fsync(handle.fileno())
        for staged, target in temporary:
            os.replace(staged, target)
    finally:
        for staged, _ in temporary:
            staged.unlink(missing_ok=True)
    for stale in out.glob("level*_*.npy"):  # the levels of an earlier clustering into this folder would be read too
        match = re.fullmatch(r"level(\d+)_(assignment|centroids)\.npy", stale.name)
        if match and int(match.group(1)) > len(levels):
            stale.unlink()
    return {"images": len(paths), "levels": list(level_sizes), "largest": int(sizes.max()),
            "smallest": int(sizes.min()), "output": str(out)}


def run_clustering(settings: ClusterSettings, digest: str, group=ALONE) -> Optional[Dict[str, Any]]:
    """One task's part of a clustering (all of it for one task): its rows, the levels (from the checkpoint where
    it has them), and on rank 0 the results. Returns the summary on rank 0 (with "resumed": the stages read
    back), None elsewhere."""
    started = time.perf_counter()
    share, paths = select_share(settings, digest, group)
    logger.info("task %d of %d: rows %d to %d of the %d usable ones (%.1f s)", group.rank, group.size, share.start,
                share.stop, share.total, time.perf_counter() - started)
    identity = dict(settings.identity(), manifest=digest)
    state = ClusterState(Path(settings.output) / CHECKPOINT, identity, group)
    started = time.perf_counter()
    levels = hierarchical_kmeans(share, settings.levels, settings.iterations, settings.resampling_steps,
                                 settings.per_cluster, settings.seed, settings.gpu, settings.sample_per_centroid,
                                 group, state, settings.fit)
    logger.info("task %d: k-means done (%.1f s)", group.rank, time.perf_counter() - started)
    summary, error = None, None
    if group.rank == 0:
        try:
            started = time.perf_counter()
            summary = write_clusters(settings.output, levels, paths, settings.embeddings, digest, settings.levels)
            logger.info("results written (%.1f s)", time.perf_counter() - started)
            shutil.rmtree(state.folder, ignore_errors=True)  # done
        except StoreChanged as changed:
            shutil.rmtree(state.folder, ignore_errors=True)  # the checkpoint of a store that is no more
            error = str(changed)
        except DistillError as failure:
            error = str(failure)
        except OSError as failure:
            error = _os_error(failure)
    agree(group, None, error)
    if summary is not None:
        summary["resumed"] = state.resumed
    return summary


class ClusterJob:
    """What each task of a `cluster --submit` job runs (picklable, for submitit): it joins the job's process group
    (the environment distill's training jobs use), runs its part, and returns the summary, or {"error": one
    line} on bad input. Preempted or timed out, it is requeued (submitit's checkpoint hook) and continues from
    the checkpoint."""

    def __init__(self, settings: ClusterSettings, digest: str) -> None:
        self.settings, self.digest = settings, digest

    def __call__(self) -> Dict[str, Any]:
        import torch

        from distill import distributed
        from distill.launch.slurm import export_task_environment
        from distill.logs import configure_logging

        configure_logging()
        logging.getLogger("faiss").setLevel(logging.WARNING)
        tasks = export_task_environment()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpu = self.settings.gpu and torch.cuda.is_available()
        if self.settings.gpu and not gpu:
            return {"error": "--gpu but the job's tasks see no GPU: give --gpus-per-node, or leave out --gpu"}
        group = ALONE
        if tasks > 1:
            distributed.init_from_env(torch.device("cuda", local_rank) if gpu else torch.device("cpu"))
            group = TaskGroup(gpu_device=local_rank if gpu else None)
        met = True
        try:
            result = run_clustering(self.settings, self.digest, group) or {}
        except DistillError as error:
            result = {"error": str(error)}
        except BaseException:
            met = False  # the others may be waiting in a collective: leave without meeting them
            raise
        finally:
            distributed.shutdown(meet=met)
        return result

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / time-out hook: run the job again; it continues from OUT/checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(ClusterJob(self.settings, self.digest))
