"""`distill-curate`: embed -> dedup -> cluster -> sample (or retrieve), chained through files.

    distill-curate embed --data /data/pool --checkpoint dino_deitsmall16_pretrain.pth --output emb/
    distill-curate dedup --embeddings emb/ --threshold 0.95 --output dedup/
    distill-curate cluster --embeddings emb/ --keep dedup/kept.txt --levels 1000 100 --output clusters/
    distill-curate sample --clusters clusters/ --target 100000 --output curated.txt
    distill-curate retrieve --seed seed_emb/ --pool emb/ --n 4 --output retrieved.txt

Selections are written as file lists (one path per line), which `distill train` reads with
data.dataset.kind=filelist.
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from distill.logs import configure_logging
from distill.errors import DistillError, InputError

logger = logging.getLogger("data_curation")


def _select(folder: str, memory_gb: float, keep: Optional[str] = None):
    """(rows, paths): usable embeddings of a store, in memory or streamed (see embeddings.select)."""
    from data_curation.embeddings import select

    if keep is not None and not Path(keep).is_file():
        raise InputError(f"--keep {keep} does not exist: give the kept.txt of `distill-curate dedup`")
    return select(folder, memory_gb, Path(keep).read_text().splitlines() if keep else None)


def _write_list(path: str, paths: List[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{p}\n" for p in paths))
    tmp.replace(out)


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
                  precision=args.precision, workers=args.workers)
    if args.submit:
        from distill.launch.slurm import Resources, check_cluster, make_executor

        if args.parts < 2:
            raise InputError("--submit runs one task per part: give --parts N (N >= 2)")
        resources = Resources(timeout_min=args.timeout, partition=args.partition, cpus_per_task=args.cpus_per_task,
                              gpus_per_node=args.gpus_per_node, tasks_per_node=1)
        if args.submit == "slurm":
            check_cluster(resources)
        executor = make_executor(Path(args.output) / "jobs", resources, local=args.submit == "local")
        executor.update_parameters(name="distill-curate-embed")
        jobs = executor.map_array(EmbedPart(**kwargs), list(range(args.parts)))
        print(f"submitted job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} tasks, one part each, into "
              f"{args.output}/part_*; logs in {args.output}/jobs/")
        if args.wait:
            print(f"{sum(job.result() for job in jobs)} embeddings in {args.output}")
        return
    written = embed_images(**kwargs, part=args.part)
    print(f"{written} embeddings in {args.output}" + (f"/part_{args.part:04d}" if args.parts > 1 else ""))


def cmd_dedup(args) -> None:
    from data_curation.dedup import deduplicate, far_from
    from data_curation.pictures import duplicate_grid

    rows, paths = _select(args.embeddings, args.memory_gb)
    kept, groups = deduplicate(rows, args.threshold, args.k, args.exact_below)
    if args.against:
        reference, _ = _select(args.against, args.memory_gb)
        far = far_from(rows.subset(kept), reference, args.threshold)
        print(f"removed {len(kept) - len(far)} images too close to {args.against}")
        kept = kept[far]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    _write_list(str(out / "kept.txt"), [paths[i] for i in kept])
    named = [[paths[i] for i in g] for g in groups]
    (out / "groups.json").write_text(json.dumps(named, indent=1))
    if named and args.grid:
        duplicate_grid(out / "duplicate_groups.png", named)
    print(f"kept {len(kept)} of {len(paths)} images; {len(groups)} duplicate groups -> {out}/kept.txt, groups.json"
          + (", duplicate_groups.png" if named and args.grid else ""))


def cmd_cluster(args) -> None:
    from data_curation.kmeans import hierarchical_kmeans, leaf_of_top
    from data_curation.pictures import cluster_sizes

    rows, paths = _select(args.embeddings, args.memory_gb, args.keep)
    levels = hierarchical_kmeans(rows, args.levels, args.iterations, args.resampling_steps, args.per_cluster,
                                 args.seed, args.gpu, args.sample_per_centroid)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for number, (level, assignment) in enumerate(zip(levels, leaf_of_top(levels)), start=1):
        np.save(out / f"level{number}_centroids.npy", level.centroids)
        np.save(out / f"level{number}_assignment.npy", assignment)
    np.save(out / "distances.npy", levels[0].distances)
    _write_list(str(out / "paths.txt"), paths)
    sizes = np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))
    cluster_sizes(out / "cluster_sizes.png", sizes, title=f"{len(paths)} images in {len(sizes)} clusters")
    print(f"{len(paths)} images in levels of {', '.join(str(k) for k in args.levels)} clusters -> {out} "
          f"(largest cluster {sizes.max()}, smallest {sizes.min()}; cluster_sizes.png)")


def _levels(folder: Path) -> List[np.ndarray]:
    levels = sorted(folder.glob("level*_assignment.npy"), key=lambda p: int(p.name[5:].split("_")[0]))
    if not levels or not (folder / "paths.txt").is_file():
        raise InputError(f"no level*_assignment.npy and paths.txt in {folder}: run `distill-curate cluster` first")
    return [np.load(p) for p in levels]


def cmd_sample(args) -> None:
    from data_curation.pictures import cluster_sizes
    from data_curation.sampling import balanced_sample

    folder = Path(args.clusters)
    assignments = _levels(folder)
    paths = (folder / "paths.txt").read_text().splitlines()
    distances = np.load(folder / "distances.npy") if args.mode == "closest" else None
    chosen = balanced_sample(assignments, args.target, args.seed, args.mode, distances)
    _write_list(args.output, [paths[i] for i in chosen])
    clusters = int(assignments[0].max()) + 1
    before = np.bincount(assignments[0], minlength=clusters)
    after = np.bincount(assignments[0][chosen], minlength=clusters)
    picture = Path(args.output).with_suffix(".png")
    cluster_sizes(picture, before, after, title=f"{clusters} clusters: {len(paths)} images sampled to {len(chosen)}")
    print(f"sampled {len(chosen)} of {len(paths)} images -> {args.output} (cluster sizes: {picture})")


def cmd_retrieve(args) -> None:
    from data_curation.retrieval import retrieve, same_cluster

    seed, _ = _select(args.seed, args.memory_gb)
    if args.clusters:
        from data_curation.kmeans import assign

        folder = Path(args.clusters)
        pool_clusters = _levels(folder)[0]
        pool_paths = (folder / "paths.txt").read_text().splitlines()
        seed_clusters, _ = assign(seed, np.load(folder / "level1_centroids.npy"))
        distances = np.load(folder / "distances.npy") if args.per_cluster else None
        chosen = [pool_paths[i] for i in same_cluster(seed_clusters, pool_clusters, args.per_cluster, distances)]
    else:
        pool, pool_paths = _select(args.pool, args.memory_gb)
        ids, _ = retrieve(seed, pool, args.n)
        chosen = list(dict.fromkeys(pool_paths[i] for i in ids.flatten()))
    _write_list(args.output, chosen)
    print(f"retrieved {len(chosen)} pool images for {len(seed)} seed images -> {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-curate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = dict(type=float, default=8.0, help="largest embedding matrix held in memory (GiB)")

    embed = commands.add_parser("embed", help="images -> L2-normalised float16 embedding shards (resumable)")
    embed.add_argument("--data", required=True, help="a folder, a file list, or fashion_mnist")
    embed.add_argument("--split", default=None)
    embed.add_argument("--checkpoint", help="any checkpoint distill can load (a run, DINO, DINOv2, DeiT)")
    embed.add_argument("--backbone", help="registered name (needed for files it cannot recognise)")
    embed.add_argument("--npy", help="precomputed embeddings [N, D] instead of images (paths from --data's list)")
    embed.add_argument("--output", required=True)
    embed.add_argument("--shard-size", type=int, default=50_000)
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--limit", type=int, default=0)
    embed.add_argument("--device", default="cpu")
    embed.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto: bf16 on GPUs and on CPUs that multiply bf16 natively, else fp32")
    embed.add_argument("--workers", type=int, default=0, help="processes decoding images beside the forward")
    embed.add_argument("--parts", type=int, default=1, help="split the images into this many parts (part_NNNN)")
    embed.add_argument("--part", type=int, default=0, help="embed only this part (0-based)")
    embed.add_argument("--submit", choices=("slurm", "local"), help="one job-array task per part (submitit)")
    embed.add_argument("--partition", help="with --submit slurm")
    embed.add_argument("--timeout", type=int, default=240, help="minutes per task, with --submit")
    embed.add_argument("--cpus-per-task", type=int, default=8)
    embed.add_argument("--gpus-per-node", type=int, default=0)
    embed.add_argument("--wait", action="store_true", help="with --submit: wait for every task")
    embed.add_argument("--flip-average", action="store_true",
                       help="average each image's features with its mirror's (copy detection: copies are often flipped)")
    embed.set_defaults(run=cmd_embed)

    dedup = commands.add_parser("dedup", help="near-duplicate removal over a cosine kNN graph")
    dedup.add_argument("--embeddings", required=True)
    dedup.add_argument("--threshold", type=float, default=0.95)
    dedup.add_argument("--k", type=int, default=16, help="neighbours per image in the graph")
    dedup.add_argument("--exact-below", type=int, default=200_000, help="exact search up to this many images")
    dedup.add_argument("--against", help="embeddings of an evaluation set: drop pool images this close to it")
    dedup.add_argument("--no-grid", dest="grid", action="store_false", help="skip duplicate_groups.png")
    dedup.add_argument("--output", required=True)
    dedup.add_argument("--memory-gb", **memory)
    dedup.set_defaults(run=cmd_dedup)

    cluster = commands.add_parser("cluster", help="hierarchical k-means with resampling")
    cluster.add_argument("--embeddings", required=True)
    cluster.add_argument("--keep", help="only these paths (e.g. dedup/kept.txt)")
    cluster.add_argument("--levels", type=int, nargs="+", required=True, help="clusters per level, fine to coarse")
    cluster.add_argument("--iterations", type=int, default=20)
    cluster.add_argument("--resampling-steps", type=int, default=1)
    cluster.add_argument("--per-cluster", type=int, default=10)
    cluster.add_argument("--sample-per-centroid", type=int, default=256,
                         help="centroids are fitted on at most this many points per cluster, then all are assigned")
    cluster.add_argument("--gpu", action="store_true", help="faiss on the GPUs (needs the gpu extra)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--output", required=True)
    cluster.add_argument("--memory-gb", **memory)
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
    retrieve.add_argument("--n", type=int, default=4)
    retrieve.add_argument("--per-cluster", type=int, default=0,
                          help="with --clusters: at most this many per cluster, nearest the centroid first (0: all)")
    retrieve.add_argument("--output", required=True)
    retrieve.add_argument("--memory-gb", **memory)
    retrieve.set_defaults(run=cmd_retrieve)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "retrieve" and bool(args.pool) == bool(args.clusters):
        parser.error("retrieve needs one of --pool or --clusters")
    configure_logging()
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU build it loaded
    try:
        args.run(args)
    except (DistillError, FileNotFoundError) as error:
        print(f"distill-curate {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
