"""Retrieval-based curation: for each image of a curated seed set, its N nearest pool images (cosine), exact,
with the pool read one batch (shard) at a time; or the cluster-based variant: the pool images that share a
cluster with a seed image."""

import numpy as np

from data_curation.embeddings import as_rows
from distill.errors import InputError
from distill.progress import progress


def retrieve(seed, pool, n: int = 4):
    """(indices [len(seed), n] into pool, nearest first; their cosine similarities)."""
    import faiss

    seed, pool = as_rows(seed), as_rows(pool)
    if seed.dim != pool.dim:
        raise InputError(f"seed embeddings have dimension {seed.dim}, the pool's {pool.dim}")
    if not 0 < n <= len(pool):
        raise InputError(f"cannot retrieve {n} neighbours from a pool of {len(pool)}")
    queries = seed.take(np.arange(len(seed)))
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    with progress(total=len(pool), desc="retrieve", unit="vec", leave=False) as bar:
        for start, batch in pool.batches():
            index = faiss.IndexFlatIP(pool.dim)
            index.add(batch)
            sims, ids = index.search(queries, min(n, len(batch)))
            best_sims = np.concatenate([best_sims, sims], axis=1)
            best_ids = np.concatenate([best_ids, ids + start], axis=1)
            top = np.argsort(-best_sims, axis=1, kind="stable")[:, :n]
            best_sims = np.take_along_axis(best_sims, top, axis=1)
            best_ids = np.take_along_axis(best_ids, top, axis=1)
            bar.update(len(batch))
    return best_ids, best_sims


def same_cluster(seed_clusters: np.ndarray, pool_clusters: np.ndarray, per_cluster: int = 0,
                 distances: np.ndarray = None) -> np.ndarray:
    """Positions of pool images whose cluster holds at least one seed image (the cluster-based variant); with
    per_cluster, at most that many per cluster, those nearest their centroid first."""
    from data_curation.kmeans import nearest_in_each_cluster

    chosen = np.flatnonzero(np.isin(pool_clusters, np.unique(seed_clusters)))
    if per_cluster and len(chosen):
        chosen = nearest_in_each_cluster(chosen, pool_clusters, distances, per_cluster)
    return chosen
