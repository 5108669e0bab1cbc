"""`distill-curate`: embed -> dedup -> cluster -> sample (or retrieve), chained through files.

    distill-curate embed --data /data/pool --checkpoint dino_deitsmall16_pretrain.pth --output emb/
    distill-curate dedup --embeddings emb/ --threshold 0.95 --output dedup/
    distill-curate cluster --embeddings emb/ --keep dedup/kept.txt --levels 1000 100 --output clusters/
    distill-curate sample --clusters clusters/ --target 100000 --output curated.txt
    distill-curate retrieve --seed seed_emb/ --pool emb/ --n 4 --output retrieved.txt
    distill-curate evaluate-retrieval --queries q_emb/ --gallery emb/ --truth truth.tsv --output results.json

Selections are written as file lists (`distill.data.filelists`: absolute paths, any bytes), which `distill train`
reads with data.dataset.kind=filelist.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from distill.data.filelists import describe_os_error, readable_name, write_file_list
from distill.config import number, parse_sets
from distill.logs import configure_logging
from distill.errors import DistillError, InputError
from distill.eval.retrieval import truth_sets, write_metrics

logger = logging.getLogger("data_curation")


def _check_keep(keep: str) -> None:
    if Path(keep).is_dir():
        raise InputError(f"--keep {readable_name(keep)} is a folder: give the kept.txt that `distill-curate dedup` "
                         "wrote into it")
    if not Path(keep).is_file():
        raise InputError(f"--keep {readable_name(keep)} does not exist: give the kept.txt of `distill-curate dedup`")


def _select(folder: str, memory_gb: float, keep: Optional[str] = None):
    """(rows, paths): usable embeddings of a store, in memory or streamed (see embeddings.select)."""
    from data_curation.embeddings import keep_forms, report_missing_kept, select

    if keep is None:
        return select(folder, memory_gb)
    _check_keep(keep)
    forms = keep_forms(keep)
    rows, paths = select(folder, memory_gb, [name for names in forms for name in names])
    report_missing_kept(forms, paths, keep, folder)
    return rows, paths


def _write_list(path: str, paths: List[str]) -> None:
    if os.path.isdir(path):
        raise InputError(f"--output {readable_name(path)} is a folder: give the file the list goes to (e.g. "
                         f"{readable_name(os.path.join(path, 'selected.txt'))})")
    write_file_list(path, paths)


def _compatible(first: str, second: str, what: str) -> None:
    """Two stores whose rows are compared: the same dimension, and (where they record it) the same model."""
    from data_curation.embeddings import EmbeddingStore, same_space

    a, b = EmbeddingStore(first), EmbeddingStore(second)
    if a.dim != b.dim:
        raise InputError(f"{readable_name(first)} holds embeddings of dimension {a.dim}, {what} "
                         f"{readable_name(second)} of dimension {b.dim}: embed both with the same model and the same "
                         "--descriptor (and whitening)")
    same_space(a.source, b.source, first, second)


class EmbedPart:
    """One task of an embedding job array: part `part` of `parts` (picklable, for submitit)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, part: int) -> int:
        from data_curation.embed import embed_images

        configure_logging()
        return embed_images(**self.kwargs, part=part)


def cmd_embed(args) -> None:
    from data_curation.embed import embed_images

    kwargs = dict(data=args.data, output=args.output, checkpoint=args.checkpoint, backbone=args.backbone,
                  split=args.split, shard_size=args.shard_size, batch_size=args.batch_size, device=args.device,
                  npy=args.npy, limit=args.limit, flip_average=args.flip_average, parts=args.parts,
                  precision=args.precision, workers=args.workers, overwrite=args.overwrite,
                  descriptor=args.descriptor, gem_p=args.gem_p, scales=args.scales, whiten_on=args.whiten_on,
                  whiten_dim=args.whiten_dim, overrides=parse_sets(args.set), checkpoint_key=args.checkpoint_key)
    if args.submit:
        from data_curation.embeddings import EmbeddingStore
        from distill.launch.slurm import Resources, check_cluster, check_local, make_executor, submit_or_explain

        if args.parts < 2:
            raise InputError("--submit runs one task per part: give --parts N (N >= 2)")
        resources = Resources(timeout_min=args.timeout, partition=args.partition, cpus_per_task=args.cpus_per_task,
                              gpus_per_node=args.gpus_per_node, tasks_per_node=1)
        check_cluster(resources) if args.submit == "slurm" else check_local(resources)
        if args.overwrite:  # the whole array starts again: every part of the folder goes, then each task starts
            EmbeddingStore(args.output).clear()
            kwargs["overwrite"] = False
        jobs_folder = Path(args.output) / "jobs"
        executor = make_executor(jobs_folder, resources, local=args.submit == "local")
        executor.update_parameters(name="distill-curate-embed")
        jobs = submit_or_explain(lambda: executor.map_array(EmbedPart(**kwargs), list(range(args.parts))),
                                 jobs_folder)
        print(f"submitted job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} tasks, one part each, into "
              f"{args.output}/part_*; logs in {args.output}/jobs/")
        if args.wait:
            print(f"{sum(job.result() for job in jobs)} embeddings in {args.output}")
        return
    written = embed_images(**kwargs, part=args.part)
    where = readable_name(args.output) + (f"/part_{args.part:04d}" if args.parts > 1 else "")
    print(f"{written} embeddings in {where}")


def _positions(names: List[str], paths: List[str], store: str, truth: str) -> List[int]:
    """The rows a ground-truth file names (see `_truth_pairs`) among the usable rows of a store."""
    from data_curation.embeddings import EmbeddingStore

    where = {p: i for i, p in enumerate(paths)}
    folder = os.path.dirname(os.path.abspath(truth))
    every: Optional[List[str]] = None
    out = []
    for name in names:
        found = next((where[form] for form in (name, os.path.join(folder, name), os.path.abspath(name))
                      if form in where), None)
        if found is None and name.isdigit():
            every = EmbeddingStore(store).paths() if every is None else every
            found = where.get(every[int(name)]) if int(name) < len(every) else None
        if found is None:
            raise InputError(f"--truth {readable_name(truth)} names {readable_name(name)}, which is not among the "
                             f"usable embeddings of {readable_name(store)}: write the paths as the store names them "
                             "(absolute; relative ones are taken from the truth file's folder) or its row numbers, "
                             "and embed every image the truth names")
        out.append(found)
    return out


def _truth_pairs(truth: str, queries: tuple, gallery: tuple) -> List[tuple]:
    """(query row, gallery row) of each pair of a ground-truth file: `query<TAB>gallery` lines, each side a path
    (as written, from the file's folder, or from the working folder) or a row number of its store;
    queries and gallery are (store folder, paths of its usable rows)."""
    from distill.eval.retrieval import read_truth

    pairs = read_truth(truth)
    left = _positions([a for a, _ in pairs], queries[1], queries[0], truth)
    right = _positions([b for _, b in pairs], gallery[1], gallery[0], truth)
    return list(zip(left, right))


def cmd_dedup(args) -> None:
    from data_curation.dedup import deduplicate_graph

    if args.submit:
        return _submit_dedup(args)
    if args.parts != 1:
        raise InputError(f"--parts {args.parts} runs with --submit slurm or --submit local; without --submit "
                         "`dedup` is one process")
    if args.against:
        _compatible(args.embeddings, args.against, "the evaluation set")
    rows, paths = _select(args.embeddings, args.memory_gb)
    truth = _dedup_truth(args, paths)
    kept, groups, graph, scores = deduplicate_graph(rows, args.threshold, args.k, args.exact_below, args.nprobe)
    _write_dedup(args, rows, paths, kept, groups, graph, scores, truth)


def _dedup_truth(args, paths: List[str]) -> Optional[List[tuple]]:
    truth = _truth_pairs(args.truth, (args.embeddings, paths), (args.embeddings, paths)) if args.truth else None
    if truth is not None and any(a == b for a, b in truth):
        raise InputError(f"--truth {readable_name(args.truth)} pairs an image with itself: list each copy with its "
                         "original")
    return truth


def _write_dedup(args, rows, paths: List[str], kept, groups, graph, scores, truth) -> None:
    """The files of `dedup` (kept.txt, groups.json, duplicate_groups.png, copy_detection.json), of one process or
    of the merged parts of a job, each written whole."""
    from data_curation.dedup import far_from, pair_detection
    from data_curation.pictures import duplicate_grid
    from distill.files import atomic_write_text

    if args.against:
        reference, _ = _select(args.against, args.memory_gb)
        far = far_from(rows.subset(kept), reference, args.threshold)
        print(f"removed {len(kept) - len(far)} images too close to {readable_name(args.against)}")
        kept = kept[far]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    _write_list(str(out / "kept.txt"), [paths[i] for i in kept])
    named = [[paths[i] for i in g] for g in groups]
    atomic_write_text(out / "groups.json", json.dumps(named, indent=1))
    if named and args.grid:
        duplicate_grid(out / "duplicate_groups.png", named)
    else:  # an earlier run's picture would show groups this run did not find
        (out / "duplicate_groups.png").unlink(missing_ok=True)
    if truth is None:  # nor may its scores stand beside this run's list
        (out / "copy_detection.json").unlink(missing_ok=True)
    print(f"kept {len(kept)} of {len(paths)} images; {len(groups)} duplicate groups -> "
          f"{readable_name(str(out))}/kept.txt, groups.json" + (", duplicate_groups.png" if named and args.grid else ""))
    if truth is not None:
        found = pair_detection(graph, scores, groups, np.array(truth))
        write_metrics(out / "copy_detection.json", {**found, "truth": os.path.abspath(args.truth),
                                                   "threshold": args.threshold, "k": args.k})
        print(f"copy detection of the {found['truth_pairs']} pairs of {readable_name(args.truth)} by the graph: "
              f"µAP {found['microAP']:.4f}, recall {found['pair_recall']:.4f} as edges, {found['group_recall']:.4f} "
              f"in one group ({found['edges']} edges at or above {args.threshold}) -> "
              f"{readable_name(str(out))}/copy_detection.json")


def _submit_dedup(args) -> None:
    """`dedup --submit slurm|local --parts N`: the index built here, one job-array task per part searching its
    rows (sharded_dedup.py), then the parts' edges merged here into the files of one process."""
    from data_curation.dedup import check_threshold
    from data_curation.distributed_kmeans import manifest_digest
    from data_curation.embeddings import EmbeddingStore
    from data_curation.sharded_dedup import DedupPart, check_parts, dedup_settings, merged_graph, prepare
    from distill.launch.slurm import Resources, check_cluster, check_local, make_executor, submit_or_explain

    check_threshold(args.threshold)
    if args.parts < 1:
        check_parts(args.parts, 1)
    local = args.submit == "local"
    resources = Resources(timeout_min=args.timeout, partition=args.partition, cpus_per_task=args.cpus_per_task,
                          tasks_per_node=1)
    check_local(resources) if local else check_cluster(resources)
    if args.against:
        _compatible(args.embeddings, args.against, "the evaluation set")
    digest = manifest_digest(EmbeddingStore(args.embeddings))  # before reading: a store written meanwhile is refused
    rows, paths = _select(args.embeddings, args.memory_gb)
    truth = _dedup_truth(args, paths)
    check_parts(args.parts, len(rows))
    settings = dedup_settings(args)
    todo = prepare(settings, digest, rows)
    jobs_folder = Path(args.output) / "jobs"
    if todo:
        absent = [p for p in (jobs_folder, *jobs_folder.parents) if not p.exists()]
        executor = make_executor(jobs_folder, resources, local=local)
        executor.update_parameters(name="distill-curate-dedup")
        threads = max(1, min(args.cpus_per_task, (os.cpu_count() or 1) // len(todo))) if local else args.cpus_per_task
        try:
            with _threads_of_tasks(threads):
                jobs = submit_or_explain(lambda: executor.map_array(DedupPart(settings, digest), todo), jobs_folder)
        except InputError as refused:
            _explain_refusal(refused, args.partition, absent)
        print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({'local processes' if local else 'SLURM'}): "
              f"{len(jobs)} of {args.parts} parts to search"
              + (f" ({args.parts - len(todo)} found finished)" if len(todo) < args.parts else "")
              + f"; logs in {readable_name(str(jobs_folder))}/")
        if not args.wait:
            print(f"run the same command with --wait once the job is done: it merges the parts' edges into "
                  f"{readable_name(args.output)}/kept.txt, groups.json")
            return
        _results_of(jobs, jobs_folder, "finished parts are not searched again")
    else:
        print(f"all {args.parts} parts found finished in {readable_name(str(Path(args.output) / 'parts'))}: merging")
    kept, groups, graph, scores = merged_graph(settings, digest, len(rows))
    _write_dedup(args, rows, paths, kept, groups, graph, scores, truth)


def _explain_refusal(refused: InputError, partition: Optional[str], absent: List[Path]) -> None:
    """Raises a refused submission again, once the folders made for it are removed (if they stayed empty), naming
    the partition when it is what was refused."""
    for created in absent:  # innermost first
        if created.is_dir() and not any(created.iterdir()):
            created.rmdir()
    if partition and "partition" in str(refused).lower():
        raise InputError(f"{refused}: --partition {partition!r} is not one this cluster takes; `sinfo` "
                         "lists its partitions") from None
    raise refused


def _results_of(jobs: list, jobs_folder: Path, again: str) -> list:
    """The results of submitted jobs, once every one has ended; a job that ended without one (killed, failed) is
    one line naming its logs; a task's {"error": ...} is bad input."""
    import submitit

    results, failed = [], None
    for job in jobs:
        try:
            results.append(job.results()[0])
        except submitit.core.utils.UncompletedJobError as failure:
            lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
            reason = next((line for line in lines if "(state:" in line), None) or next(
                (line for line in reversed(lines) if "Error" in line and not line.startswith("Error stream")),
                lines[0] if lines else "no reason given")
            failed = failed or DistillError(
                f"job {job.job_id} ended without its result ({reason[:300]}): its logs are in "
                f"{readable_name(str(jobs_folder / str(job.job_id)))}/; run the same command again to {again}")
    if failed is not None:
        raise failed
    for result in results:
        if "error" in result:
            raise InputError(result["error"])
    return results


def _cluster_settings(args):
    from data_curation.distributed_kmeans import ClusterSettings

    return ClusterSettings(embeddings=args.embeddings, output=args.output, levels=list(args.levels),
                           iterations=args.iterations, resampling_steps=args.resampling_steps,
                           per_cluster=args.per_cluster, sample_per_centroid=args.sample_per_centroid, seed=args.seed,
                           memory_gb=args.memory_gb, keep=args.keep, gpu=args.gpu, fit=args.fit)


def _print_clustering(summary: dict) -> None:
    print(f"{summary['images']} images in levels of {', '.join(str(k) for k in summary['levels'])} clusters -> "
          f"{readable_name(summary['output'])} "
          f"(largest cluster {summary['largest']}, smallest {summary['smallest']}; cluster_sizes.png)")


def cmd_cluster(args) -> None:
    from data_curation.distributed_kmeans import manifest_digest, write_clusters
    from data_curation.embeddings import EmbeddingStore
    from data_curation.kmeans import check_gpu_faiss, hierarchical_kmeans

    if args.submit:
        return _submit_cluster(args)
    if args.gpu:
        check_gpu_faiss()
    if args.tasks != 1:
        raise InputError(f"--tasks {args.tasks} runs with --submit slurm or --submit local; without --submit "
                         "`cluster` is one process")
    digest = manifest_digest(EmbeddingStore(args.embeddings))  # before reading: a store written meanwhile is refused
    rows, paths = _select(args.embeddings, args.memory_gb, args.keep)
    levels = hierarchical_kmeans(rows, args.levels, args.iterations, args.resampling_steps, args.per_cluster,
                                 args.seed, args.gpu, args.sample_per_centroid, fit=args.fit)
    _print_clustering(write_clusters(args.output, levels, paths, args.embeddings, digest, args.levels))


@contextlib.contextmanager
def _threads_of_tasks(threads: int):
    """OMP_NUM_THREADS and OPENBLAS_NUM_THREADS for the processes submitted meanwhile (SLURM and the local executor
    pass the environment on), unless already set: tasks that share a machine would otherwise each start a BLAS
    thread per core."""
    given = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    for key, value in given.items():
        if value is None:
            os.environ[key] = str(threads)
    try:
        yield
    finally:
        for key, value in given.items():
            if value is None:
                os.environ.pop(key, None)


def _submit_cluster(args) -> None:
    """`cluster --submit slurm|local --tasks N`: everything that can be checked here is, before submitting."""
    from data_curation.distributed_kmeans import ClusterJob, check_tasks, manifest_digest
    from data_curation.embeddings import EmbeddingStore
    from distill.launch.slurm import Resources, check_cluster, check_local, make_executor, submit_or_explain

    if args.nodes < 1 or args.tasks % args.nodes:
        raise InputError(f"--tasks {args.tasks} over --nodes {args.nodes}: give a number of tasks that the nodes share "
                         "evenly")
    store = EmbeddingStore(args.embeddings)
    manifest = store.manifest()  # parts of different dimensions are refused here
    store.dim  # and a store without embeddings
    check_tasks(len(manifest["shards"]), args.tasks)
    if args.keep:
        _check_keep(args.keep)
    per_node = args.tasks // args.nodes
    gpus = args.gpus_per_node or (per_node if args.gpu else 0)
    resources = Resources(nodes=args.nodes, timeout_min=args.timeout, partition=args.partition,
                          cpus_per_task=args.cpus_per_task, gpus_per_node=gpus, tasks_per_node=per_node)
    local = args.submit == "local"
    check_local(resources) if local else check_cluster(resources)
    settings = _cluster_settings(args)
    jobs_folder = Path(args.output) / "jobs"
    absent = [p for p in (jobs_folder, *jobs_folder.parents) if not p.exists()]
    executor = make_executor(jobs_folder, resources, local=local)
    executor.update_parameters(name="distill-curate-cluster")
    threads = max(1, min(args.cpus_per_task, (os.cpu_count() or 1) // per_node)) if local else args.cpus_per_task
    try:
        with _threads_of_tasks(threads):
            job = submit_or_explain(lambda: executor.submit(ClusterJob(settings, manifest_digest(store))),
                                    jobs_folder)
    except InputError as refused:
        _explain_refusal(refused, args.partition, absent)
    print(f"submitted job {job.job_id} ({'local processes' if local else 'SLURM'}, {args.tasks} task(s)): results "
          f"into {readable_name(args.output)}, logs in {readable_name(str(jobs_folder / str(job.job_id)))}/")
    if not args.wait:
        return
    result = _results_of([job], jobs_folder, "continue from its checkpoint")[0]
    if result.get("resumed"):
        print(f"continued from the checkpoint in {readable_name(args.output)}/checkpoint: "
              f"{', '.join(result['resumed'])} read back")
    _print_clustering(result)


EMBEDDINGS_RECORD = "embeddings.json"  # written by distributed_kmeans.write_clusters


def _clusters(folder: Path, distances: bool = False, centroids: bool = False) -> Dict[str, object]:
    """The files of a `cluster` output, checked against each other: {"assignments" (one array a level, finest
    first), "paths", and with the flags "distances" and "centroids" (of level 1), "record" (embeddings.json)}."""
    from data_curation.embeddings import load_array, read_listing

    numbered = {int(m.group(1)): p for p in folder.glob("level*_assignment.npy")
                if (m := re.fullmatch(r"level(\d+)_assignment\.npy", p.name))}
    levels = [numbered[n] for n in sorted(numbered)]
    if not levels or not (folder / "paths.txt").is_file():
        raise InputError(f"no level*_assignment.npy and paths.txt in {readable_name(str(folder))}: run "
                         "`distill-curate cluster` first")
    fix = "run `distill-curate cluster` again into a new folder"
    if sorted(numbered) != list(range(1, len(levels) + 1)):
        raise InputError(f"{readable_name(str(folder))} holds the levels {sorted(numbered)}, not 1 to {len(levels)}: "
                         f"{fix}")
    paths = read_listing(folder / "paths.txt")
    out: Dict[str, object] = {"paths": paths, "assignments": [], "record": None}
    for level in levels:
        assignment = load_array(level, "cluster assignment", fix)
        if assignment.ndim != 1 or assignment.dtype.kind not in "iu" or len(assignment) != len(paths) or (
                len(assignment) and assignment.min() < 0):
            raise InputError(f"{readable_name(str(level))} holds {assignment.dtype} {list(assignment.shape)}, not one "
                             f"cluster number for each of the {len(paths)} paths of paths.txt: {fix}")
        out["assignments"].append(assignment)
    if distances:
        values = load_array(folder / "distances.npy", "cluster distances", fix)
        if values.shape != (len(paths),):
            raise InputError(f"{readable_name(str(folder / 'distances.npy'))} holds {list(values.shape)} values for "
                             f"{len(paths)} paths: {fix}")
        out["distances"] = values
    if centroids:
        values = load_array(folder / "level1_centroids.npy", "centroids", fix)
        clusters = int(out["assignments"][0].max()) + 1 if len(paths) else 0
        if values.ndim != 2 or len(values) < clusters:
            raise InputError(f"{readable_name(str(folder / 'level1_centroids.npy'))} holds {list(values.shape)}, not "
                             f"[{clusters}, dim] centroids: {fix}")
        out["centroids"] = values
        record = folder / EMBEDDINGS_RECORD
        if record.is_file():
            try:
                out["record"] = json.loads(record.read_text())
            except ValueError:
                raise InputError(f"{readable_name(str(record))} is not the JSON `cluster` wrote: {fix}") from None
    return out


def cmd_sample(args) -> None:
    from data_curation.pictures import cluster_sizes
    from data_curation.sampling import balanced_sample

    picture = Path(args.output).with_suffix(".png")
    if picture == Path(args.output):
        raise InputError(f"--output {readable_name(args.output)} is where the sampled list goes, and its name with "
                         ".png is where the picture of cluster sizes goes: name the list another way (e.g. "
                         f"{readable_name(str(picture.with_suffix('.txt')))})")
    found = _clusters(Path(args.clusters), distances=args.mode == "closest")
    assignments, paths, distances = found["assignments"], found["paths"], found.get("distances")
    chosen = balanced_sample(assignments, args.target, args.seed, args.mode, distances)
    _write_list(args.output, [paths[i] for i in chosen])
    clusters = int(assignments[0].max()) + 1
    before = np.bincount(assignments[0], minlength=clusters)
    after = np.bincount(assignments[0][chosen], minlength=clusters)
    cluster_sizes(picture, before, after, title=f"{clusters} clusters: {len(paths)} images sampled to {len(chosen)}")
    print(f"sampled {len(chosen)} of {len(paths)} images -> {readable_name(args.output)} (cluster sizes: "
          f"{readable_name(str(picture))})")


def cmd_retrieve(args) -> None:
    from data_curation.retrieval import retrieve, same_cluster

    if args.clusters:
        from data_curation.embeddings import EmbeddingStore, same_space
        from data_curation.kmeans import assign

        clusters = _clusters(Path(args.clusters), distances=bool(args.per_cluster), centroids=True)
        pool_clusters, pool_paths = clusters["assignments"][0], clusters["paths"]
        centroids, seed_store = clusters["centroids"], EmbeddingStore(args.seed)
        if seed_store.dim != centroids.shape[1]:
            raise InputError(f"the seed set {readable_name(args.seed)} has dimension {seed_store.dim}, the centroids "
                             f"of {readable_name(args.clusters)} dimension {centroids.shape[1]}: embed the seed set "
                             "with the model that embedded the pool")
        record = clusters["record"] or {}
        same_space(seed_store.source, record.get("source"), args.seed, record.get("embeddings", args.clusters))
        seed, _ = _select(args.seed, args.memory_gb)
        seed_clusters, _ = assign(seed, centroids)
        distances = clusters.get("distances")
        chosen = [pool_paths[i] for i in same_cluster(seed_clusters, pool_clusters, args.per_cluster, distances)]
    else:
        _compatible(args.seed, args.pool, "the pool")
        seed, _ = _select(args.seed, args.memory_gb)
        pool, pool_paths = _select(args.pool, args.memory_gb)
        ids, _ = retrieve(seed, pool, args.n)
        chosen = list(dict.fromkeys(pool_paths[i] for i in ids.flatten()))
    _write_list(args.output, chosen)
    print(f"retrieved {len(chosen)} pool images for {len(seed)} seed images -> {readable_name(args.output)}")


def cmd_evaluate_retrieval(args) -> None:
    from data_curation.retrieval import retrieve
    from distill.eval.retrieval import format_metrics, retrieval_metrics

    if args.k < 1:
        raise InputError(f"--k is the number of gallery items ranked for each query, at least 1, got {args.k}")
    _compatible(args.queries, args.gallery, "the gallery")
    queries, query_paths = _select(args.queries, args.memory_gb)
    gallery, gallery_paths = _select(args.gallery, args.memory_gb)
    pairs = _truth_pairs(args.truth, (args.queries, query_paths), (args.gallery, gallery_paths))
    truth = truth_sets(len(queries), pairs)
    k = min(args.k, len(gallery))
    ids, scores = retrieve(queries, gallery, k)
    results = retrieval_metrics(scores, ids, truth)
    print(format_metrics(results, f"{len(queries)} queries of {readable_name(args.queries)} against "
                                  f"{len(gallery)} images of {readable_name(args.gallery)}, top {k}:"))
    if args.output:
        write_metrics(Path(args.output), {**results, "k": k, "queries_store": os.path.abspath(args.queries),
                                        "gallery_store": os.path.abspath(args.gallery),
                                        "truth": os.path.abspath(args.truth)})
        print(f"-> {readable_name(args.output)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-curate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = dict(type=number(float, above=0), default=8.0, help="largest embedding matrix held in memory (GiB)")

    embed = commands.add_parser("embed", help="images -> L2-normalised float16 embedding shards (resumable)")
    embed.add_argument("--data", required=True, help="a folder, a file list, or fashion_mnist")
    embed.add_argument("--split", default=None)
    embed.add_argument("--checkpoint", help="any checkpoint distill can load (a run, DINO, DINOv2, DeiT)")
    embed.add_argument("--backbone", help="registered name: with --checkpoint, for files it cannot recognise; "
                                            "alone, random weights (for tests)")
    embed.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="backbone overrides, e.g. depth=4 (for files whose sizes are not the name's defaults)")
    embed.add_argument("--checkpoint-key", help="network in a training checkpoint: teacher (default), student")
    embed.add_argument("--npy", help="precomputed embeddings [N, D] instead of images (paths from --data's list)")
    embed.add_argument("--output", required=True)
    embed.add_argument("--shard-size", type=number(at_least=1), default=50_000)
    embed.add_argument("--batch-size", type=number(at_least=1), default=256)
    embed.add_argument("--limit", type=number(at_least=0), default=0)
    embed.add_argument("--device", default="cpu")
    embed.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto: bf16 on GPUs and on CPUs that multiply bf16 natively, else fp32")
    embed.add_argument("--workers", type=number(at_least=0), default=0, help="processes decoding images beside the forward")
    embed.add_argument("--parts", type=number(at_least=1), default=1, help="split the images into this many parts (part_NNNN)")
    embed.add_argument("--part", type=number(at_least=0), default=0, help="embed only this part (0-based)")
    embed.add_argument("--submit", choices=("slurm", "local"), help="one job-array task per part (submitit)")
    embed.add_argument("--partition", help="with --submit slurm")
    embed.add_argument("--timeout", type=number(at_least=1), default=240, help="minutes per task, with --submit")
    embed.add_argument("--cpus-per-task", type=number(at_least=1), default=8)
    embed.add_argument("--gpus-per-node", type=number(at_least=0), default=0)
    embed.add_argument("--wait", action="store_true", help="with --submit: wait for every task")
    embed.add_argument("--overwrite", action="store_true",
                       help="start the store again: remove its files (only those) instead of resuming; a resume with "
                            "other settings than the store's is refused otherwise")
    embed.add_argument("--flip-average", action="store_true",
                       help="average each image's features with its mirror's (copy detection: copies are often flipped)")
    embed.add_argument("--descriptor", choices=("cls", "copy"), default="cls",
                       help="cls: the class token; copy: DINO's copy-detection descriptor, the class token and the "
                            "GeM-pooled patch tokens of the last block (twice the dimension)")
    embed.add_argument("--gem-p", type=number(float, above=0), help="with --descriptor copy: the GeM exponent (default 4)")
    embed.add_argument("--scales", type=number(float, above=0), nargs="+",
                       help="with --descriptor copy: image size factors whose descriptors are averaged (default 1)")
    embed.add_argument("--whiten-on",
                       help="with --descriptor copy: PCA-whiten, learned on this store of unwhitened copy descriptors "
                            "(or on the embedded set itself: self), or as a whitened store's whitening.npz does")
    embed.add_argument("--whiten-dim", type=number(at_least=1),
                       help="with --whiten-on: dimensions kept (default: all that the learning set spans)")
    embed.set_defaults(run=cmd_embed)

    dedup = commands.add_parser("dedup", help="near-duplicate removal over a cosine kNN graph")
    dedup.add_argument("--embeddings", required=True)
    dedup.add_argument("--threshold", type=float, default=0.95)
    dedup.add_argument("--k", type=number(at_least=1), default=16, help="neighbours per image in the graph")
    dedup.add_argument("--exact-below", type=number(at_least=0), default=200_000, help="exact search up to this many images")
    dedup.add_argument("--nprobe", type=number(at_least=1), default=16,
                       help="inverted lists searched per image above --exact-below (fewer: faster, some pairs missed)")
    dedup.add_argument("--against", help="embeddings of an evaluation set: drop pool images this close to it")
    dedup.add_argument("--no-grid", dest="grid", action="store_false", help="skip duplicate_groups.png")
    dedup.add_argument("--output", required=True)
    dedup.add_argument("--memory-gb", **memory)
    dedup.add_argument("--truth", help="known copies, `path<TAB>path` a line: writes the graph's µAP and recall of "
                                       "them to copy_detection.json")
    dedup.add_argument("--submit", choices=("slurm", "local"),
                       help="search the graph in --parts job-array tasks (submitit) against one index of the pool, "
                            "then merge their edges here: the kept list and groups of one process")
    dedup.add_argument("--parts", type=number(at_least=1), default=1,
                       help="with --submit: tasks, each searching a contiguous range of the rows (at most the rows)")
    dedup.add_argument("--partition", help="with --submit slurm")
    dedup.add_argument("--timeout", type=number(at_least=1), default=240,
                       help="minutes per task, with --submit: a task that reaches it is requeued")
    dedup.add_argument("--cpus-per-task", type=number(at_least=1), default=8)
    dedup.add_argument("--wait", action="store_true",
                       help="with --submit: wait for the tasks and merge their edges (otherwise run the same "
                            "command again with --wait: finished parts are not searched again)")
    dedup.set_defaults(run=cmd_dedup)

    cluster = commands.add_parser("cluster", help="hierarchical k-means with resampling")
    cluster.add_argument("--embeddings", required=True)
    cluster.add_argument("--keep", help="only these paths (e.g. dedup/kept.txt)")
    cluster.add_argument("--levels", type=number(at_least=1), nargs="+", required=True, help="clusters per level, fine to coarse")
    cluster.add_argument("--iterations", type=number(at_least=1), help="of each fit (default: 20 with --fit lloyd, 6 with swaps)")
    cluster.add_argument("--resampling-steps", type=number(at_least=0), default=1)
    cluster.add_argument("--per-cluster", type=number(at_least=1), default=10)
    cluster.add_argument("--sample-per-centroid", type=number(at_least=1),
                         help="centroids are fitted on at most this many points per cluster, then all are assigned "
                              "(default: 256 with --fit lloyd, 10 with swaps)")
    cluster.add_argument("--fit", choices=("lloyd", "swaps"), default="lloyd",  # data_curation.kmeans.FITS
                         help="lloyd: k-means as faiss runs it; swaps: for ten thousand clusters and more, Lloyd with "
                              "local-search swaps on a small sample, then refined on every image")
    cluster.add_argument("--gpu", action="store_true", help="faiss on the GPUs (needs the gpu extra)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--output", required=True)
    cluster.add_argument("--memory-gb", **memory)
    cluster.add_argument("--submit", choices=("slurm", "local"),
                         help="k-means over --tasks tasks of one job (submitit), each reading its own shards; the "
                              "results are those of one process with the same seed")
    cluster.add_argument("--tasks", type=number(at_least=1), default=1, help="with --submit: tasks of the job (at most the shards)")
    cluster.add_argument("--nodes", type=number(at_least=1), default=1, help="with --submit slurm: nodes sharing the tasks")
    cluster.add_argument("--partition", help="with --submit slurm")
    cluster.add_argument("--timeout", type=number(at_least=1), default=240,
                         help="minutes, with --submit: a job that reaches it is requeued and continues from its "
                              "checkpoint")
    cluster.add_argument("--cpus-per-task", type=number(at_least=1), default=8)
    cluster.add_argument("--gpus-per-node", type=number(at_least=0), default=0, help="with --submit and --gpu (default: one a task)")
    cluster.add_argument("--wait", action="store_true", help="with --submit: wait for the job and print its summary")
    cluster.set_defaults(run=cmd_cluster)

    sample = commands.add_parser("sample", help="balanced hierarchical sampling to a target size")
    sample.add_argument("--clusters", required=True)
    sample.add_argument("--target", type=int, required=True)
    sample.add_argument("--mode", choices=("random", "closest"), default="random")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", required=True)
    sample.set_defaults(run=cmd_sample)

    retrieve = commands.add_parser("retrieve", help="the N nearest pool images of each seed image")
    retrieve.add_argument("--seed", required=True, help="embeddings of the curated seed set")
    retrieve.add_argument("--pool", help="pool embeddings (the N nearest of each seed image)")
    retrieve.add_argument("--clusters", help="instead: a `cluster` output; every pool image sharing a seed's cluster")
    retrieve.add_argument("--n", type=number(at_least=1), help="with --pool: nearest pool images per seed image "
                                                                  "(default 4)")
    retrieve.add_argument("--per-cluster", type=number(at_least=0), default=0,
                          help="with --clusters: at most this many per cluster, nearest the centroid first (0: all)")
    retrieve.add_argument("--output", required=True)
    retrieve.add_argument("--memory-gb", **memory)
    retrieve.set_defaults(run=cmd_retrieve)

    evaluate = commands.add_parser("evaluate-retrieval",
                                   help="mAP, recall@1/5/10 and copy-detection µAP of queries against a gallery")
    evaluate.add_argument("--queries", required=True, help="embeddings of the queries (a store)")
    evaluate.add_argument("--gallery", required=True, help="embeddings of the gallery (a store)")
    evaluate.add_argument("--truth", required=True,
                          help="the relevant pairs, `query<TAB>gallery` a line (paths, or row numbers of the stores)")
    evaluate.add_argument("--k", type=int, default=100, help="gallery items ranked for each query")
    evaluate.add_argument("--output", help="the metrics as JSON")
    evaluate.add_argument("--memory-gb", **memory)
    evaluate.set_defaults(run=cmd_evaluate_retrieval)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "retrieve":
        if bool(args.pool) == bool(args.clusters):
            parser.error("retrieve takes --pool (the N nearest of each seed image) or --clusters (every image of a "
                         "seed's cluster), " + ("not both" if args.pool else "one of them"))
        if args.clusters and args.n is not None:
            parser.error("--n goes with --pool; with --clusters, --per-cluster caps what each cluster gives")
        if args.pool and args.per_cluster:
            parser.error("--per-cluster goes with --clusters; with --pool, --n is how many of each seed's nearest")
        args.n = 4 if args.n is None else args.n
    if args.command == "cluster":  # the fit's own defaults where not given
        from data_curation.kmeans import FIT_DEFAULTS

        iterations, per_centroid = FIT_DEFAULTS[args.fit]
        args.iterations = iterations if args.iterations is None else args.iterations
        args.sample_per_centroid = per_centroid if args.sample_per_centroid is None else args.sample_per_centroid
    configure_logging()
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU build it loaded
    try:
        args.run(args)
    except (DistillError, OSError) as error:
        message = str(error) if isinstance(error, DistillError) else describe_os_error(error)
        print(f"distill-curate {args.command}: error: {readable_name(message)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
