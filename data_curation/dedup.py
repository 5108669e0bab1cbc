"""Near-duplicate removal: a cosine kNN graph (faiss), edges above a similarity threshold, connected components
(union-find), one image kept per component; and removal of pool images too close to an evaluation set.

Rows held in memory are indexed in float32; streamed rows (a pool over the memory budget) go into an index of
float16 codes, filled and searched shard by shard, so memory is the index's codes plus one shard."""

import logging
from typing import Dict, List, Tuple

import numpy as np

from data_curation.embeddings import Rows, as_rows, sample_cap
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)


def build_index(rows: Rows, exact_below: int, train_per_list: int = 64, seed: int = 0):
    """A cosine (inner product) index over rows: exact below `exact_below` rows, inverted lists above
    (about 4 sqrt(N) lists, trained on a sample of train_per_list rows per list)."""
    import faiss

    n, dim = len(rows), rows.dim
    quantizer_codes = None
    if not rows.in_memory:  # codes in 3/4 of the budget: float16 (exact for float16 shards), else 8 bits
        fp16 = sample_cap(rows, n, share=0.75) * rows.dim * 4 >= n * dim * 2
        quantizer_codes = faiss.ScalarQuantizer.QT_fp16 if fp16 else faiss.ScalarQuantizer.QT_8bit
        logger.info("index of %s codes: %.2f GiB for %d rows", "float16" if fp16 else "8-bit",
                    n * dim * (2 if fp16 else 1) / 2**30, n)
    if n <= exact_below:
        index = (faiss.IndexFlatIP(dim) if quantizer_codes is None else
                 faiss.IndexScalarQuantizer(dim, quantizer_codes, faiss.METRIC_INNER_PRODUCT))
    else:
        lists = int(max(16, min(65536, 4 * np.sqrt(n))))
        coarse = faiss.IndexFlatIP(dim)
        index = (faiss.IndexIVFFlat(coarse, dim, lists, faiss.METRIC_INNER_PRODUCT) if quantizer_codes is None else
                 faiss.IndexIVFScalarQuantizer(coarse, dim, lists, quantizer_codes, faiss.METRIC_INNER_PRODUCT))
        index.nprobe = min(lists, 16)
    quantizer = getattr(index, "sq", None)
    if quantizer is not None and quantizer_codes == faiss.ScalarQuantizer.QT_8bit:
        # per-dimension ranges from a sample, widened by a fifth so that rows outside the sample are not clipped
        quantizer.rangestat, quantizer.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, 0.2
    if not index.is_trained:  # inverted lists, or 8-bit codes (their ranges)
        size = sample_cap(rows, min(n, train_per_list * (index.nlist if hasattr(index, "nlist") else 1000)), 0.25)
        sample = np.random.default_rng(seed).choice(n, size=size, replace=False)
        index.train(rows.take(np.sort(sample)))
    for _, batch in rows.batches():
        index.add(batch)
    return index


def similar_pairs(data, threshold: float, k: int = 16, exact_below: int = 200_000, with_scores: bool = False):
    """Pairs (i, j), i < j, with cosine similarity >= threshold among each row's k nearest neighbours; with
    with_scores also their similarities (pairs, scores)."""
    rows = as_rows(data)
    n = len(rows)
    if n < 2:
        empty = np.zeros((0, 2), dtype=np.int64)
        return (empty, np.zeros(0, dtype=np.float32)) if with_scores else empty
    pairs, scores = search_pairs(build_index(rows, exact_below), rows, threshold, k, n)
    return (pairs, scores) if with_scores else pairs


def search_pairs(index, rows: Rows, threshold: float, k: int, total: int, first: int = 0
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """The edges found from `rows` (rows first .. first + len(rows) of a pool of `total` rows, all in `index`):
    pairs (i, j), i < j, each once, in order, and their similarities (a pair found from both ends: the higher).
    similar_pairs searches every row; a part of a sharded dedup (sharded_dedup.py) its own, and the union of the
    parts' edges, merged by merge_pairs, is the graph of one process."""
    found, scores = [], []
    k = min(k + 1, total)
    with progress(total=len(rows), desc="kNN graph", unit="vec", leave=False) as bar:
        for start, batch in rows.batches():
            sims, ids = index.search(batch, k)
            rows_of = np.repeat(np.arange(first + start, first + start + len(ids)), k).reshape(len(ids), k)
            keep = (sims >= threshold) & (ids >= 0) & (ids != rows_of)
            found.append(np.stack([rows_of[keep], ids[keep]], axis=1))
            scores.append(sims[keep])
            bar.update(len(ids))
    pairs = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), dtype=np.int64)
    return merge_pairs(pairs, np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32))


def merge_pairs(pairs: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Edges as (min, max) pairs, each once, sorted, with the highest similarity any of its copies had."""
    if not len(pairs):
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    pairs = np.sort(np.asarray(pairs, dtype=np.int64), axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    best = np.full(len(unique), -np.inf, dtype=np.float32)  # a pair found from both ends: its higher similarity
    np.maximum.at(best, inverse.ravel(), np.asarray(scores, dtype=np.float32))
    return unique, best


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component id of each of n nodes (the smallest node of its component)."""
    if len(pairs) == 0:
        return np.arange(n)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = components(graph, directed=False)
    smallest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]


def deduplicate(data, threshold: float, k: int = 16, exact_below: int = 200_000
                ) -> Tuple[np.ndarray, List[List[int]]]:
    """(indices kept, duplicate groups): one image per connected component of the >= threshold graph, the
    first in order; groups list every component of two or more images, largest first."""
    kept, groups, _, _ = deduplicate_graph(data, threshold, k, exact_below)
    return kept, groups


def deduplicate_graph(data, threshold: float, k: int = 16, exact_below: int = 200_000):
    """deduplicate, and the graph it worked on: (kept, groups, pairs [m, 2], their similarities [m])."""
    check_threshold(threshold)
    rows = as_rows(data)
    pairs, scores = similar_pairs(rows, threshold, k, exact_below, with_scores=True)
    kept, groups = kept_and_groups(len(rows), pairs)
    return kept, groups, pairs, scores


def check_threshold(threshold: float) -> None:
    if not -1 <= threshold <= 1:
        raise InputError(f"a cosine threshold lies in [-1, 1], got {threshold}")


def kept_and_groups(n: int, pairs: np.ndarray) -> Tuple[np.ndarray, List[List[int]]]:
    """One row kept per connected component of the graph (its first), and the components of two or more rows,
    largest first."""
    components = connected_components(n, pairs)
    kept = np.flatnonzero(components == np.arange(n))
    groups: Dict[int, List[int]] = {}
    for i in np.flatnonzero(components != np.arange(n)):
        groups.setdefault(int(components[i]), [int(components[i])]).append(int(i))
    return kept, sorted(groups.values(), key=len, reverse=True)


def pair_detection(pairs: np.ndarray, scores: np.ndarray, groups: List[List[int]], truth: np.ndarray,
                   ) -> Dict[str, float]:
    """How a dedup graph finds known copies (truth: pairs [t, 2] of row positions): µAP of its edges ranked by
    similarity against the truth, the fraction of truth pairs that are edges, and the fraction that ended in one
    duplicate group (what dedup removes)."""
    from distill.eval.retrieval import micro_average_precision

    truth = np.unique(np.sort(np.asarray(truth, dtype=np.int64).reshape(-1, 2), axis=1), axis=0)
    if not len(truth):
        raise InputError("no ground-truth pairs to measure the graph against")
    wanted = {(int(a), int(b)) for a, b in truth}
    correct = np.fromiter(((int(a), int(b)) in wanted for a, b in pairs), dtype=bool, count=len(pairs))
    group_of = {member: number for number, group in enumerate(groups) for member in group}
    grouped = sum(1 for a, b in wanted if a in group_of and group_of.get(a) == group_of.get(b))
    return {"microAP": micro_average_precision(scores, correct, len(truth)), "pair_recall": float(correct.sum() / len(truth)),
            "group_recall": grouped / len(truth), "truth_pairs": int(len(truth)), "edges": int(len(pairs)),
            "correct_edges": int(correct.sum())}


def far_from(pool, reference, threshold: float) -> np.ndarray:
    """Positions of pool rows whose nearest reference row (an evaluation set) has cosine below threshold."""
    import faiss

    pool, reference = as_rows(pool), as_rows(reference)
    if reference.dim != pool.dim:
        raise InputError(f"pool embeddings have dimension {pool.dim}, the evaluation set's {reference.dim}")
    index = faiss.IndexFlatIP(reference.dim)
    for _, batch in reference.batches():
        index.add(batch)
    keep = []
    for start, batch in pool.batches():
        sims, _ = index.search(batch, 1)
        keep.append(np.flatnonzero(sims[:, 0] < threshold) + start)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
