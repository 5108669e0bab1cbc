"""Hierarchical k-means with resampling (Vo et al. 2024) on faiss: level 1 clusters the points, each next level
clusters the previous level's centroids; resampling steps re-fit each level's centroids on a balanced sample of
points closest to the current centroids, so that dense regions do not swallow the centroids."""

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from distill.errors import InputError


@dataclass
class Level:
    centroids: np.ndarray  # [k, D]
    assignment: np.ndarray  # [n] cluster of each input row of this level
    inertia: float


def kmeans(x: np.ndarray, k: int, iterations: int = 20, seed: int = 0, init: np.ndarray = None,
           gpu: bool = False) -> Level:
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if k < 1 or k > len(x):
        raise InputError(f"cannot make {k} clusters of {len(x)} points: choose between 1 and {len(x)}")
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, gpu=gpu, spherical=True,
                      max_points_per_centroid=max(256, (len(x) + k - 1) // k))
    km.train(x, init_centroids=init)
    distances, labels = km.index.search(x, 1)
    inertia = float(np.sum((x - km.centroids[labels[:, 0]]) ** 2))
    return Level(km.centroids.copy(), labels[:, 0].astype(np.int64), inertia)


def resample(x: np.ndarray, level: Level, per_cluster: int, iterations: int, seed: int) -> Level:
    """Re-fit the centroids on up to per_cluster points nearest each centroid, then reassign every point."""
    import faiss

    chosen = []
    for c in range(len(level.centroids)):
        members = np.flatnonzero(level.assignment == c)
        if len(members) == 0:
            continue
        d = np.sum((x[members] - level.centroids[c]) ** 2, axis=1)
        chosen.append(members[np.argsort(d)[:per_cluster]])
    subset = np.concatenate(chosen)
    k = min(len(level.centroids), len(subset))
    refit = kmeans(x[subset], k, iterations, seed, init=level.centroids[:k].copy())
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(refit.centroids)
    _, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    assignment = labels[:, 0].astype(np.int64)
    inertia = float(np.sum((x - refit.centroids[assignment]) ** 2))
    return Level(refit.centroids, assignment, inertia)


def hierarchical_kmeans(x: np.ndarray, clusters: Sequence[int], iterations: int = 20, resampling_steps: int = 0,
                        per_cluster: int = 10, seed: int = 0) -> List[Level]:
    """Levels from fine to coarse: clusters[0] clusters the points, clusters[i] the centroids of level i - 1."""
    if not len(clusters) or any(b > a for a, b in zip(clusters, clusters[1:])):
        raise InputError(f"cluster counts go from fine to coarse (non-increasing), got {list(clusters)}")
    levels: List[Level] = []
    data = np.ascontiguousarray(x, dtype=np.float32)
    for number, k in enumerate(clusters):
        level = kmeans(data, k, iterations, seed + number)
        for step in range(resampling_steps):
            level = resample(data, level, per_cluster, iterations, seed + 100 * (step + 1) + number)
        levels.append(level)
        data = level.centroids
    return levels


def leaf_of_top(levels: List[Level]) -> List[np.ndarray]:
    """For each level, the cluster of every point (row of the input) at that level."""
    paths, current = [], levels[0].assignment
    paths.append(current)
    for level in levels[1:]:
        current = level.assignment[current]
        paths.append(current)
    return paths
