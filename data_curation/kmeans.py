"""Hierarchical k-means with resampling (Vo et al. 2024) on faiss: level 1 clusters the points, each next level
clusters the previous level's centroids; resampling steps re-fit each level's centroids on the points closest
to the current centroids (a balanced sample), so that dense regions do not swallow the centroids.

Centroids are fitted on a sample of at most `sample_per_centroid` points per cluster (faiss's rule); every
point is then assigned in one streamed pass, so a pool read shard by shard never sits whole in memory."""

from dataclasses import dataclass
from typing import List, Sequence

import logging

import numpy as np

from data_curation.embeddings import Rows, as_rows, sample_cap
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)


@dataclass
class Level:
    centroids: np.ndarray  # [k, D]
    assignment: np.ndarray  # [n] cluster of each input row of this level
    distances: np.ndarray  # [n] squared distance of each row to its centroid
    inertia: float  # the sum of `distances`


def nearest_centroids(batch: np.ndarray, centroids: np.ndarray, norms: np.ndarray, chunk: int = None):
    """(nearest centroid, squared distance) of each row of a float32 batch, as |x|^2 - 2 x.c + |c|^2 from one
    matrix product per chunk of rows. numpy's multithreaded BLAS runs this product about three times faster than
    faiss's flat index search on CPU, and for k in the thousands the product is nearly all of the assignment."""
    chunk = chunk or max(256, min(8192, 2**25 // max(1, len(centroids))))  # scores of a chunk: at most 128 MiB
    labels = np.empty(len(batch), dtype=np.int64)
    distances = np.empty(len(batch), dtype=np.float32)
    for start in range(0, len(batch), chunk):
        x = batch[start : start + chunk]
        scores = x @ centroids.T
        scores *= -2.0
        scores += norms
        best = scores.argmin(axis=1)
        labels[start : start + len(x)] = best
        d = scores[np.arange(len(x)), best] + np.einsum("ij,ij->i", x, x)
        distances[start : start + len(x)] = np.maximum(d, 0.0)  # rounding can make a zero distance negative
    return labels, distances


def assign(rows: Rows, centroids: np.ndarray, gpu: bool = False, desc: str = "assign"):
    """(nearest centroid, squared distance) of every row, one batch at a time: on the GPU through faiss, on the
    CPU through `nearest_centroids`."""
    if centroids.ndim != 2 or centroids.shape[1] != rows.dim:
        raise InputError(f"rows of dimension {rows.dim} cannot be assigned to centroids of shape "
                         f"{list(centroids.shape)}: they come from different models")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if gpu:
        import faiss

        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(centroids.shape[1]))
        index.add(centroids)
    else:
        norms = np.einsum("ij,ij->i", centroids, centroids)
    labels = np.empty(len(rows), dtype=np.int64)
    distances = np.empty(len(rows), dtype=np.float32)
    with progress(total=len(rows), desc=desc, unit="vec", leave=False) as bar:
        for start, batch in rows.batches():
            if gpu:
                d, i = index.search(batch, 1)
                i, d = i[:, 0], d[:, 0]
            else:
                i, d = nearest_centroids(np.ascontiguousarray(batch, dtype=np.float32), centroids, norms)
            labels[start : start + len(batch)], distances[start : start + len(batch)] = i, d
            bar.update(len(batch))
    return labels, distances


def kmeans(data, k: int, iterations: int = 20, seed: int = 0, init: np.ndarray = None, gpu: bool = False,
           sample_per_centroid: int = 256, subset: np.ndarray = None, spherical: bool = True) -> Level:
    """k-means of the rows (or of rows[subset]), then every row assigned to its nearest centroid. Spherical
    (unit centroids, as for cosine embeddings) unless told otherwise."""
    import faiss

    rows = as_rows(data)
    pool = len(rows) if subset is None else len(subset)
    if not 1 <= k <= pool:
        raise InputError(f"cannot make {k} clusters of {pool} points: choose between 1 and {pool}")
    rng = np.random.default_rng(seed)
    chosen = np.arange(len(rows)) if subset is None else np.asarray(subset)
    cap = sample_cap(rows, sample_per_centroid * k)
    if cap < min(len(chosen), sample_per_centroid * k):
        logger.info("fitting %d centroids on %d points (%.0f per centroid) to stay within the memory budget",
                    k, cap, cap / k)
    if len(chosen) > cap:
        chosen = np.sort(rng.choice(chosen, size=max(cap, k), replace=False))
    train = rows.take(chosen)
    km = faiss.Kmeans(rows.dim, k, niter=iterations, seed=seed, gpu=gpu, spherical=spherical, verbose=False,
                      max_points_per_centroid=max(sample_per_centroid, -(-len(train) // k)), min_points_per_centroid=1)
    km.train(train, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    centroids = km.centroids.copy()
    labels, distances = assign(rows, centroids, gpu, desc=f"assign to {k}")
    return Level(centroids, labels, distances, float(distances.astype(np.float64).sum()))


def nearest_in_each_cluster(rows: np.ndarray, clusters: np.ndarray, distances: np.ndarray, count: int) -> np.ndarray:
    """The rows (positions into clusters / distances), up to `count` per cluster, nearest their centroid first;
    sorted. One sort, not one scan per cluster."""
    order = rows[np.lexsort((distances[rows], clusters[rows]))]
    ordered = clusters[order]
    first = np.searchsorted(ordered, ordered, side="left")  # start of each row's cluster in the order
    return np.sort(order[np.arange(len(order)) - first < count])


def closest_per_cluster(level: Level, per_cluster: int) -> np.ndarray:
    """Positions of up to per_cluster rows nearest each centroid."""
    return nearest_in_each_cluster(np.arange(len(level.assignment)), level.assignment, level.distances, per_cluster)


def resample(data, level: Level, per_cluster: int, iterations: int, seed: int, gpu: bool = False,
             sample_per_centroid: int = 256) -> Level:
    """Re-fit the centroids on up to per_cluster points nearest each centroid, then reassign every point."""
    rows = as_rows(data)
    subset = closest_per_cluster(level, per_cluster)
    k = min(len(level.centroids), len(subset))
    return kmeans(rows, k, iterations, seed, init=level.centroids[:k], gpu=gpu,
                  sample_per_centroid=sample_per_centroid, subset=subset)


def hierarchical_kmeans(data, clusters: Sequence[int], iterations: int = 20, resampling_steps: int = 0,
                        per_cluster: int = 10, seed: int = 0, gpu: bool = False,
                        sample_per_centroid: int = 256) -> List[Level]:
    """Levels from fine to coarse: clusters[0] clusters the points, clusters[i] the centroids of level i - 1."""
    if not len(clusters) or any(b > a for a, b in zip(clusters, clusters[1:])):
        raise InputError(f"cluster counts go from fine to coarse (non-increasing), got {list(clusters)}")
    if per_cluster < 1 or resampling_steps < 0 or iterations < 1:
        raise InputError("--per-cluster and --iterations must be positive, --resampling-steps not negative")
    levels: List[Level] = []
    rows = as_rows(data)
    for number, k in enumerate(clusters):
        level = kmeans(rows, k, iterations, seed + number, gpu=gpu, sample_per_centroid=sample_per_centroid)
        for step in range(resampling_steps):
            level = resample(rows, level, per_cluster, iterations, seed + 100 * (step + 1) + number, gpu,
                             sample_per_centroid)
        levels.append(level)
        rows = as_rows(level.centroids)
    return levels


def leaf_of_top(levels: List[Level]) -> List[np.ndarray]:
    """For each level, the cluster of every point (row of the input) at that level."""
    paths, current = [], levels[0].assignment
    paths.append(current)
    for level in levels[1:]:
        current = level.assignment[current]
        paths.append(current)
    return paths
