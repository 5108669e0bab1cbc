#!/usr/bin/env python
"""Curation at scale on this machine: 1,000,000 x 384 float16 synthetic embeddings (a long-tailed mixture of
clusters plus injected near-copies), then `distill-curate dedup`, `cluster` (two levels) and `sample` as separate
processes, each with wall time and peak memory, the pool over the memory budget so that every step streams it;
then our k-means (Lloyd as faiss runs it, data_curation/kmeans.py) against scikit-learn's MiniBatchKMeans on the
same points, in one process.

    .venv/bin/python tools/curation_scale.py                       # the full run (about half an hour on 2 cores)
    .venv/bin/python tools/curation_scale.py --points 100000 --levels 1000 100 --compare-k 100   # a quick look
    .venv/bin/python tools/curation_scale.py --compare-only --compare-k 1000 10000   # only the k-means comparison
    .venv/bin/python tools/curation_scale.py --points 10000000 --levels 1000 100 --tasks 1 2 --nprobe 1 \
        --compare-k --memory-gb 2 --output /work/scale10m   # ten million, one process and two local tasks

With --tasks 1 2, dedup and cluster run once as one process and once as `--submit local` jobs of 2 parts / tasks;
the peak memory of every process of a step is polled, and the outputs of the runs are compared.

The comparison fits our k-means once per setting ITERATIONSxPOINTS_PER_CENTROID of --compare-settings (by default
today's library defaults, 20x256, and the cluster step's --iterations x --sample-per-centroid) and
MiniBatchKMeans once, each on the same rows; every inertia is the sum over all of those rows of the squared
distance to the nearest centroid, computed by the same assignment pass.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from data_curation.embeddings import EmbeddingStore
from distill.data.filelists import read_paths


def generate(folder: Path, points: int, dim: int, clusters: int, copies: float, shard: int, seed: int = 0):
    """Points around `clusters` centres with Zipf-like sizes (the largest ~1000x the smallest); a share `copies`
    of the rows are near-copies (cosine > 0.99) of earlier rows. Returns the (original, copy) row pairs."""
    store = EmbeddingStore(folder)
    if store.manifest()["complete"]:
        return np.load(folder / "copies.npy")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.75
    weights /= weights.sum()
    pairs = []
    for start in range(0, points, shard):
        n = min(shard, points - start)
        x = centres[rng.choice(clusters, size=n, p=weights)] + 0.04 * rng.normal(size=(n, dim)).astype(np.float32)
        twins = np.flatnonzero(rng.random(n) < copies)
        twins = twins[twins > 0]
        originals = rng.integers(0, twins)  # an earlier row of the same shard
        x[twins] = x[originals] + 0.004 * rng.normal(size=(len(twins), dim)).astype(np.float32)
        pairs.append(np.stack([originals + start, twins + start], axis=1))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.append(x, [f"synthetic/{i:07d}.jpg" for i in range(start, start + n)])
    np.save(folder / "copies.npy", np.concatenate(pairs))
    store.finish()
    return np.concatenate(pairs)


def _tree_rss(root: int) -> Dict[int, int]:
    """Resident memory in bytes of `root` and every process below it (read from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree, grown = {root}, True
    while grown:
        grown = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    rss = {}
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1]) * 1024
    return rss


def measured(command) -> Tuple[float, float, float]:
    """Run one step as its own process, with what it starts (local job tasks): (wall seconds, peak resident
    memory of all its processes together, of the largest one), in GiB, from a poll every 0.2 s and the kernel's
    own peak of the main process."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peaks = {"total": 0, "largest": 0}
    done = threading.Event()

    def poll():
        while not done.wait(0.2):
            rss = _tree_rss(process.pid)
            if rss:
                peaks["total"] = max(peaks["total"], sum(rss.values()))
                peaks["largest"] = max(peaks["largest"], max(rss.values()))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step failed: {' '.join(command)}")
    main = usage.ru_maxrss * 1024  # kilobytes on Linux
    return wall, max(peaks["total"], main) / 2**30, max(peaks["largest"], main) / 2**30


def compare_kmeans(folder: Path, k: int, settings, seed: int = 0, points: int = None, minibatch: bool = True):
    """Our k-means at each (iterations, points per centroid) of `settings`, then MiniBatchKMeans(batch 4096,
    one init), on the first `points` rows of the store (all by default): seconds and inertia of each."""
    from sklearn.cluster import MiniBatchKMeans

    from data_curation.kmeans import assign, kmeans
    from data_curation.embeddings import ArrayRows

    vectors = EmbeddingStore(folder).load()
    rows = ArrayRows(vectors if points is None else np.ascontiguousarray(vectors[:points]))
    del vectors
    results = {}
    for iterations, per_centroid, fit in settings:
        start = time.perf_counter()
        level = kmeans(rows, k, iterations, seed, spherical=False,  # the objective MiniBatchKMeans minimises
                       sample_per_centroid=per_centroid, fit=fit)
        name = f"ours {iterations}x{per_centroid}" + ("" if fit == "lloyd" else f" {fit}")
        results[name] = {"seconds": time.perf_counter() - start, "inertia": level.inertia, "iterations": iterations,
                         "sample_per_centroid": per_centroid, "fit": fit}
        if fit != "lloyd":  # the inertia of the nearest centroid of every row (not timed), for comparison
            results[name]["inertia_nearest"] = float(assign(rows, level.centroids)[1].astype(np.float64).sum())
        print(f"  k={k} ours ({fit}) {iterations} iterations, {per_centroid} points per centroid: "
              f"{results[name]['seconds']:.1f} s, inertia {level.inertia:.1f}", flush=True)
    if minibatch:
        start = time.perf_counter()
        mbk = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=1, random_state=seed).fit(rows.vectors)
        seconds = time.perf_counter() - start
        _, distances = assign(rows, mbk.cluster_centers_.astype(np.float32))
        results["minibatch"] = {"seconds": seconds, "inertia": float(distances.astype(np.float64).sum()),
                                "epochs": int(mbk.n_iter_)}
        print(f"  k={k} MiniBatchKMeans: {seconds:.1f} s, inertia {results['minibatch']['inertia']:.1f}", flush=True)
    return results


def report_kmeans(k: int, points: int, comparison) -> None:
    """One line per fit, and the ratios against MiniBatchKMeans (time: >1 means ours is faster; inertia: >1 means
    our clustering is tighter)."""
    print(f"\nk-means, k={k}, all {points} points, one process:")
    m = comparison.get("minibatch")
    for name, result in comparison.items():
        if name == "minibatch":
            print(f"scikit-learn MiniBatchKMeans (batch 4096, {m['epochs']} epochs): {m['seconds']:.1f} s, "
                  f"inertia {m['inertia']:.1f}")
            continue
        line = (f"ours (Euclidean, {result.get('fit', 'lloyd')}, {result['iterations']} iterations, fitted on "
                f"{result['sample_per_centroid']} points per centroid): {result['seconds']:.1f} s, inertia "
                f"{result['inertia']:.1f}")
        if "inertia_nearest" in result:
            line += f" (every row at its nearest centroid: {result['inertia_nearest']:.1f})"
        if m is not None:
            line += (f"; time ratio MiniBatchKMeans / ours {m['seconds'] / result['seconds']:.2f}, "
                     f"inertia ratio MiniBatchKMeans / ours {m['inertia'] / result['inertia']:.4f}")
        print(line)


def agreement(first: Path, second: Path, name: str) -> str:
    """How a file of two runs compares: 'identical', the largest difference of two float arrays, or 'DIFFERENT'."""
    if name.endswith(".npy"):
        a, b = np.load(first / name), np.load(second / name)
        if a.shape == b.shape and a.dtype.kind == "f" and not np.array_equal(a, b):
            return f"within {np.abs(a - b).max():.1e}"
        return "identical" if np.array_equal(a, b) else "DIFFERENT"
    return "identical" if (first / name).read_bytes() == (second / name).read_bytes() else "DIFFERENT"


def setting(text: str):
    """ITERATIONSxPOINTS_PER_CENTROID[:FIT], e.g. 10x64 (Lloyd) or 6x10:swaps."""
    text, _, fit = text.lower().partition(":")
    iterations, per_centroid = text.split("x")
    return int(iterations), int(per_centroid), fit or "lloyd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--centres", type=int, default=20_000)
    parser.add_argument("--copies", type=float, default=0.02)
    parser.add_argument("--levels", type=int, nargs="+", default=[10_000, 1_000])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--sample-per-centroid", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.2, help="share of the deduplicated pool to sample")
    parser.add_argument("--memory-gb", type=float, default=0.5, help="below the pool's float32 size: steps stream")
    parser.add_argument("--nprobe", type=int, default=16, help="dedup --nprobe")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1],
                        help="run dedup and cluster with each of these task counts (above 1: --submit local "
                             "--parts/--tasks N), and check that they agree")
    parser.add_argument("--compare-k", type=int, nargs="*", default=[1000], help="none: skip the comparison")
    parser.add_argument("--compare-settings", type=setting, nargs="+", default=None,
                        help="our fits to compare, ITERATIONSxPOINTS_PER_CENTROID[:FIT] (FIT: lloyd, the default, "
                             "or swaps; default: 20x256 and the cluster step's --iterations x "
                             "--sample-per-centroid)")
    parser.add_argument("--compare-points", type=int, default=None, help="compare on the first N rows only")
    parser.add_argument("--compare-only", action="store_true", help="skip dedup, cluster and sample")
    parser.add_argument("--no-minibatch", action="store_true", help="fit ours only")
    parser.add_argument("--output", default="runs/curation_scale")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    emb = out / "embeddings"
    start = time.perf_counter()
    pairs = generate(emb, args.points, args.dim, args.centres, args.copies, shard=50_000)
    print(f"generated {args.points} x {args.dim} float16 in {time.perf_counter() - start:.0f} s "
          f"({len(pairs)} injected near-copies)", flush=True)
    steps = {}
    if not args.compare_only:
        curate = [sys.executable, "-m", "data_curation.cli"]
        memory = ["--memory-gb", str(args.memory_gb)]
        results = {}
        for tasks in args.tasks:
            suffix = "" if tasks == 1 else f"_{tasks}tasks"
            dedup_out, cluster_out = out / f"dedup{suffix}", out / f"clusters{suffix}"
            job = [] if tasks == 1 else ["--submit", "local", "--wait"]
            steps[f"dedup{suffix}"] = measured(
                curate + ["dedup", "--embeddings", str(emb), "--threshold", "0.97", "--no-grid", "--nprobe",
                          str(args.nprobe), "--output", str(dedup_out)] + memory + job
                + (["--parts", str(tasks)] if job else []))
            steps[f"cluster{suffix}"] = measured(
                curate + ["cluster", "--embeddings", str(emb), "--keep", str(dedup_out / "kept.txt"),
                          "--levels", *map(str, args.levels), "--iterations", str(args.iterations),
                          "--sample-per-centroid", str(args.sample_per_centroid), "--output", str(cluster_out)]
                + memory + job + (["--tasks", str(tasks)] if job else []))
            results[tasks] = (dedup_out, cluster_out)
        dedup_out, cluster_out = results[args.tasks[0]]
        kept = read_paths(dedup_out / "kept.txt")
        kept_rows = np.array([int(p[10:-4]) for p in kept])
        removed = np.setdiff1d(np.arange(args.points), kept_rows)
        found = np.isin(pairs[:, 1], removed) | np.isin(pairs[:, 0], removed)
        target = int(args.target * len(kept))
        steps["sample"] = measured(curate + ["sample", "--clusters", str(cluster_out), "--target", str(target),
                                             "--output", str(out / "curated.txt")])
        print(f"\n{args.points} x {args.dim} float16 embeddings "
              f"({args.points * args.dim * 2 / 2**30:.2f} GiB on disk, "
              f"{args.points * args.dim * 4 / 2**30:.2f} GiB as float32), --memory-gb {args.memory_gb}")
        print(f"dedup: kept {len(kept)}; injected near-copies caught: {found.mean():.4f}")
        for tasks in args.tasks[1:]:
            files = [(0, "kept.txt"), (0, "groups.json"), (1, "level1_centroids.npy")] + [
                (1, f"level{level}_assignment.npy") for level in range(1, len(args.levels) + 1)]
            print(f"{tasks} tasks against {args.tasks[0]}: " + ", ".join(
                f"{name} {agreement(results[args.tasks[0]][i], results[tasks][i], name)}" for i, name in files))
        print(f"{'step':16s} {'wall (s)':>9s} {'peak RSS, all processes (GiB)':>30s} {'largest process':>16s}")
        for name, (wall, total, largest) in steps.items():
            print(f"{name:16s} {wall:9.1f} {total:30.2f} {largest:16.2f}")
    today = (20, 256, "lloyd")  # the library's defaults
    settings = args.compare_settings or list(dict.fromkeys([today, (args.iterations, args.sample_per_centroid, "lloyd")]))
    points = min(args.points, args.compare_points or args.points)
    comparisons = {}
    for k in args.compare_k:
        comparisons[k] = compare_kmeans(emb, k, settings, points=points, minibatch=not args.no_minibatch)
        report_kmeans(k, points, comparisons[k])
    record = {"kmeans": {str(k): c for k, c in comparisons.items()}, "args": vars(args)}
    if steps:
        record.update({"steps": {k: {"seconds": w, "peak_gib_all": t, "peak_gib_largest": g}
                                 for k, (w, t, g) in steps.items()},
                       "copies_caught": float(found.mean()), "kept": len(kept)})
    name = "results.json" if steps else "kmeans_results.json"
    (out / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
