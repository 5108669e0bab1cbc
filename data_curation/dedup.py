"""Near-duplicate removal: a cosine kNN graph (faiss), edges above a similarity threshold, connected components
(union-find), one image kept per component; and removal of pool images too close to an evaluation set."""

from typing import Dict, List, Tuple

import numpy as np

from distill.errors import InputError
from distill.progress import progress


def _index(dim: int, exact_below: int, count: int):
    import faiss

    if count <= exact_below:
        return faiss.IndexFlatIP(dim)
    lists = int(max(16, min(65536, 4 * np.sqrt(count))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(lists, 16)
    return index


def _prepare(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(vectors).all():
        raise InputError("embeddings hold NaN, inf or zero vectors: leave them out first (valid_mask)")
    return vectors / norms


def similar_pairs(vectors: np.ndarray, threshold: float, k: int = 16, exact_below: int = 200_000,
                  batch: int = 65_536) -> np.ndarray:
    """Pairs (i, j), i < j, with cosine similarity >= threshold among each row's k nearest neighbours."""
    x = _prepare(vectors)
    n, dim = x.shape
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = _index(dim, exact_below, n)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, size=min(n, 256 * index.nlist), replace=False)])
    index.add(x)
    found = []
    k = min(k + 1, n)
    with progress(total=n, desc="kNN graph", unit="vec", leave=False) as bar:
        for start in range(0, n, batch):
            sims, ids = index.search(x[start : start + batch], k)
            rows = np.repeat(np.arange(start, start + len(ids)), k).reshape(len(ids), k)
            keep = (sims >= threshold) & (ids >= 0) & (ids != rows)
            found.append(np.stack([rows[keep], ids[keep]], axis=1))
            bar.update(len(ids))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component id of each of n nodes (the smallest node of its component)."""
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def deduplicate(vectors: np.ndarray, threshold: float, k: int = 16, exact_below: int = 200_000
                ) -> Tuple[np.ndarray, List[List[int]]]:
    """(indices kept, duplicate groups): one image per connected component of the >= threshold graph, the
    first in order; groups list every component of two or more images."""
    if not -1 <= threshold <= 1:
        raise InputError(f"a cosine threshold lies in [-1, 1], got {threshold}")
    pairs = similar_pairs(vectors, threshold, k, exact_below)
    components = connected_components(len(vectors), pairs)
    kept = np.flatnonzero(components == np.arange(len(vectors)))
    groups: Dict[int, List[int]] = {}
    for i, c in enumerate(components):
        groups.setdefault(int(c), []).append(i)
    return kept, [g for g in groups.values() if len(g) > 1]


def far_from(pool: np.ndarray, reference: np.ndarray, threshold: float, batch: int = 65_536) -> np.ndarray:
    """Indices of pool rows whose nearest reference row (an evaluation set) has cosine below threshold."""
    import faiss

    x, ref = _prepare(pool), _prepare(reference)
    if ref.shape[1] != x.shape[1]:
        raise InputError(f"pool embeddings have dimension {x.shape[1]}, the evaluation set's {ref.shape[1]}")
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)
    keep = []
    for start in range(0, len(x), batch):
        sims, _ = index.search(x[start : start + batch], 1)
        keep.append(np.flatnonzero(sims[:, 0] < threshold) + start)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
