"""Retrieval-based curation: for each image of a curated seed set, its N nearest pool images (cosine)."""

import numpy as np

from distill.errors import InputError


def retrieve(seed: np.ndarray, pool: np.ndarray, n: int = 4) -> np.ndarray:
    """[len(seed), n] indices into pool, nearest first."""
    import faiss

    if seed.shape[1] != pool.shape[1]:
        raise InputError(f"seed embeddings have dimension {seed.shape[1]}, the pool's {pool.shape[1]}")
    if not 0 < n <= len(pool):
        raise InputError(f"cannot retrieve {n} neighbours from a pool of {len(pool)}")
    norm = lambda v: np.ascontiguousarray(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12), np.float32)  # noqa: E731
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(norm(pool))
    _, ids = index.search(norm(seed), n)
    return ids
