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

from data_curation.embeddings import EmbeddingStore, valid_mask
from distill.errors import DistillError, InputError

logger = logging.getLogger("data_curation")


def _load(folder: str, memory_gb: float, keep: Optional[str] = None):
    """(vectors, paths, row ids) of a store, invalid rows reported and left out, optionally only `keep` paths."""
    store = EmbeddingStore(folder)
    vectors = store.load(int(memory_gb * 2**30))
    paths = store.paths()
    rows = np.arange(len(vectors))
    valid = valid_mask(vectors)
    if not valid.all():
        bad = [paths[i] for i in np.flatnonzero(~valid)[:5]]
        print(f"left out {int((~valid).sum())} NaN / inf / zero embeddings (e.g. {', '.join(bad)})", file=sys.stderr)
    if len(set(paths)) != len(paths):
        seen, unique = set(), np.zeros(len(paths), dtype=bool)
        for i, p in enumerate(paths):
            unique[i] = p not in seen
            seen.add(p)
        print(f"left out {int((~unique).sum())} rows whose path appears twice (the first is kept)", file=sys.stderr)
        valid &= unique
    if keep:
        wanted = set(Path(keep).read_text().splitlines())
        valid &= np.array([p in wanted for p in paths])
    rows = rows[valid]
    if len(rows) == 0:
        raise InputError(f"no usable embeddings in {folder}")
    return vectors[rows], [paths[i] for i in rows], rows


def _write_list(path: str, paths: List[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{p}\n" for p in paths))
    tmp.replace(out)


def cmd_embed(args) -> None:
    from data_curation.embed import embed_images

    written = embed_images(args.data, args.output, checkpoint=args.checkpoint, backbone=args.backbone,
                           split=args.split, shard_size=args.shard_size, batch_size=args.batch_size,
                           device=args.device, npy=args.npy, limit=args.limit)
    print(f"{written} embeddings in {args.output}")


def cmd_dedup(args) -> None:
    from data_curation.dedup import deduplicate, far_from

    vectors, paths, _ = _load(args.embeddings, args.memory_gb)
    kept, groups = deduplicate(vectors, args.threshold, args.k, args.exact_below)
    if args.against:
        reference, _, _ = _load(args.against, args.memory_gb)
        far = set(far_from(vectors[kept], reference, args.threshold).tolist())
        removed = len(kept) - len(far)
        kept = np.array([kept[i] for i in sorted(far)], dtype=np.int64)
        print(f"removed {removed} images too close to {args.against}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    _write_list(str(out / "kept.txt"), [paths[i] for i in kept])
    (out / "groups.json").write_text(json.dumps([[paths[i] for i in g] for g in groups], indent=1))
    print(f"kept {len(kept)} of {len(paths)} images; {len(groups)} duplicate groups -> {out}/kept.txt, groups.json")


def cmd_cluster(args) -> None:
    from data_curation.kmeans import hierarchical_kmeans, leaf_of_top

    vectors, paths, _ = _load(args.embeddings, args.memory_gb, args.keep)
    levels = hierarchical_kmeans(vectors, args.levels, args.iterations, args.resampling_steps, args.per_cluster,
                                 args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for number, (level, assignment) in enumerate(zip(levels, leaf_of_top(levels)), start=1):
        np.save(out / f"level{number}_centroids.npy", level.centroids)
        np.save(out / f"level{number}_assignment.npy", assignment)
    distances = np.sum((vectors - levels[0].centroids[levels[0].assignment]) ** 2, axis=1)
    np.save(out / "distances.npy", distances)
    _write_list(str(out / "paths.txt"), paths)
    print(f"{len(paths)} images in levels of {', '.join(str(k) for k in args.levels)} clusters -> {out}")


def cmd_sample(args) -> None:
    from data_curation.sampling import balanced_sample

    folder = Path(args.clusters)
    paths = (folder / "paths.txt").read_text().splitlines()
    levels = sorted(folder.glob("level*_assignment.npy"), key=lambda p: int(p.name[5:].split("_")[0]))
    if not levels:
        raise InputError(f"no level*_assignment.npy in {folder}: run `distill-curate cluster` first")
    assignments = [np.load(p) for p in levels]
    distances = np.load(folder / "distances.npy") if args.mode == "closest" else None
    chosen = balanced_sample(assignments, args.target, args.seed, args.mode, distances)
    _write_list(args.output, [paths[i] for i in chosen])
    print(f"sampled {len(chosen)} of {len(paths)} images -> {args.output}")


def cmd_retrieve(args) -> None:
    from data_curation.retrieval import retrieve

    seed, _, _ = _load(args.seed, args.memory_gb)
    pool, pool_paths, _ = _load(args.pool, args.memory_gb)
    ids = retrieve(seed, pool, args.n)
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
    embed.set_defaults(run=cmd_embed)

    dedup = commands.add_parser("dedup", help="near-duplicate removal over a cosine kNN graph")
    dedup.add_argument("--embeddings", required=True)
    dedup.add_argument("--threshold", type=float, default=0.95)
    dedup.add_argument("--k", type=int, default=16, help="neighbours per image in the graph")
    dedup.add_argument("--exact-below", type=int, default=200_000, help="exact search up to this many images")
    dedup.add_argument("--against", help="embeddings of an evaluation set: drop pool images this close to it")
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
    retrieve.add_argument("--pool", required=True)
    retrieve.add_argument("--n", type=int, default=4)
    retrieve.add_argument("--output", required=True)
    retrieve.add_argument("--memory-gb", **memory)
    retrieve.set_defaults(run=cmd_retrieve)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except (DistillError, FileNotFoundError) as error:
        print(f"distill-curate {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
