"""Near-duplicate removal: a cosine kNN graph (faiss), edges above a similarity threshold, connected components
(union-find), one image kept per component; and removal of pool images too close to an evaluation set.

Rows held in memory are indexed in float32; streamed rows (a pool over the memory budget) go into an index of
codes that fit the budget (code_kind: float16, 8-bit or product-quantised), filled and searched shard by shard, so
memory is the index's codes plus one shard."""

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_curation.embeddings import Rows, as_rows, sample_cap
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)


def code_kind(rows: Rows) -> Tuple[Optional[str], int]:
    """How a streamed pool's index stores its rows within 3/4 of the memory budget: ("float16", 0) (exact for
    float16 shards), ("8bit", 0), or ("pq", M): product quantisation with M sub-vectors of 4 bits (faiss's fast-scan
    layout, M / 2 bytes a row), the most sub-vectors that fit. (None, 0) for rows held in memory (float32)."""
    if rows.in_memory:
        return None, 0
    n, dim = len(rows), rows.dim
    room = sample_cap(rows, n, share=0.75) * dim * 4  # bytes, at most the pool's float32 size
    if room >= n * dim * 2:
        return "float16", 0
    if room >= n * dim:
        return "8bit", 0
    fitting = [m for m in range(2, dim + 1, 2) if dim % m == 0 and n * m // 2 <= room]
    if not fitting:
        raise InputError(f"{n} rows of dimension {dim} do not fit a deduplication index in the memory budget of "
                         f"{rows.budget_bytes / 2**30:.2g} GiB even at one byte a row: raise "
                         f"--memory-gb, or deduplicate the pool in parts and then their kept rows together")
    return "pq", max(fitting)


# Every row is matched to the list centres twice (to fill the index, to search it): one matrix product of
# rows x lists on a CPU, which above this many lists costs more than scanning the longer lists (10M rows: 4,096
# lists, 16 probed, scan about 39,000 fast-scan codes a row; a graph over 12,649 centres was no faster)
MOST_LISTS = 4096
NPROBE = 16  # inverted lists searched per row (dedup --nprobe)


def build_index(rows: Rows, exact_below: int, train_per_list: int = 64, seed: int = 0, nprobe: int = NPROBE):
    """A cosine (inner product) index over rows: exact below `exact_below` rows, inverted lists above (about
    4 sqrt(N) lists, at most MOST_LISTS, trained on a sample of train_per_list rows per list). A streamed pool's
    codes fit 3/4 of its memory budget (code_kind); product-quantised codes give approximate similarities, which
    search_pairs replaces by exact ones computed from the store."""
    import faiss

    n, dim = len(rows), rows.dim
    kind, subvectors = code_kind(rows)
    codes = {"float16": faiss.ScalarQuantizer.QT_fp16, "8bit": faiss.ScalarQuantizer.QT_8bit}.get(kind)
    if kind is not None:
        row_bytes = {"float16": 2 * dim, "8bit": dim, "pq": subvectors // 2}[kind]
        logger.info("index of %s codes: %.2f GiB for %d rows",
                    f"{subvectors}x4-bit product-quantised" if kind == "pq" else kind, n * row_bytes / 2**30, n)
    if n <= exact_below:
        if kind == "pq":
            index = faiss.IndexPQFastScan(dim, subvectors, 4, faiss.METRIC_INNER_PRODUCT)
        else:
            index = (faiss.IndexFlatIP(dim) if codes is None else
                     faiss.IndexScalarQuantizer(dim, codes, faiss.METRIC_INNER_PRODUCT))
    else:
        lists = int(max(16, min(MOST_LISTS, 4 * np.sqrt(n))))
        coarse = faiss.IndexFlatIP(dim)
        if kind == "pq":
            index = faiss.IndexIVFPQFastScan(coarse, dim, lists, subvectors, 4, faiss.METRIC_INNER_PRODUCT)
        elif codes is None:
            index = faiss.IndexIVFFlat(coarse, dim, lists, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(coarse, dim, lists, codes, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(lists, nprobe)
    quantizer = getattr(index, "sq", None)
    if quantizer is not None and codes == faiss.ScalarQuantizer.QT_8bit:
        # per-dimension ranges from a sample, widened by a fifth so that rows outside the sample are not clipped
        quantizer.rangestat, quantizer.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, 0.2
    if not index.is_trained:  # inverted lists, or 8-bit codes (their ranges)
        size = sample_cap(rows, min(n, train_per_list * (index.nlist if hasattr(index, "nlist") else 1000)), 0.25)
        sample = np.random.default_rng(seed).choice(n, size=size, replace=False)
        index.train(rows.take(np.sort(sample)))
    with progress(total=n, desc="index", unit="vec", leave=False) as bar:
        for _, batch in rows.batches():
            index.add(batch)
            bar.update(len(batch))
    if approximate(index):
        index.__dict__["rescore_margin"] = rescore_margin(index, rows, seed)  # faiss objects take no new attribute
    return index


def rescore_margin(index, rows: Rows, seed: int = 0, probes: int = 1000, k: int = 17) -> float:
    """How far below the threshold an approximate index's similarity may fall for a pair that is at or above it:
    1.5 times the largest error of the index's similarities to its nearest neighbours of `probes` rows, at least
    0.02."""
    n = len(rows)
    chosen = np.sort(np.random.default_rng(seed + 1).choice(n, size=sample_cap(rows, min(n, probes), 0.25),
                                                            replace=False))
    batch = rows.take(chosen)
    sims, ids = index.search(batch, min(k, n))
    found = ids >= 0
    exact = exact_similarities(batch, np.nonzero(found)[0], rows, ids[found])
    margin = max(0.02, 1.5 * float(np.abs(exact - sims[found]).max(initial=0.0)))
    logger.info("product-quantised similarities off by up to %.3f: neighbours within %.3f of the threshold are "
                "scored again exactly", margin / 1.5, margin)
    return margin


def similar_pairs(data, threshold: float, k: int = 16, exact_below: int = 200_000, with_scores: bool = False,
                  nprobe: int = NPROBE):
    """Pairs (i, j), i < j, with cosine similarity >= threshold among each row's k nearest neighbours; with
    with_scores also their similarities (pairs, scores)."""
    rows = as_rows(data)
    n = len(rows)
    if n < 2:
        empty = np.zeros((0, 2), dtype=np.int64)
        return (empty, np.zeros(0, dtype=np.float32)) if with_scores else empty
    pairs, scores = search_pairs(build_index(rows, exact_below, nprobe=nprobe), rows, threshold, k, n, pool=rows)
    return (pairs, scores) if with_scores else pairs


def approximate(index) -> bool:
    """Whether the index's similarities are approximations (product-quantised codes)."""
    import faiss

    return isinstance(index, (faiss.IndexIVFPQFastScan, faiss.IndexPQFastScan))


def search_pairs(index, rows: Rows, threshold: float, k: int, total: int, first: int = 0, pool: Rows = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """The edges found from `rows` (rows first .. first + len(rows) of a pool of `total` rows, all in `index`):
    pairs (i, j), i < j, each once, in order, and their similarities (a pair found from both ends: the higher).
    similar_pairs searches every row; a part of a sharded dedup (sharded_dedup.py) its own, and the union of the
    parts' edges, merged by merge_pairs, is the graph of one process. With an approximate index the neighbours
    within its rescore_margin of the threshold are scored again exactly from `pool` (the whole pool's rows; `rows`
    when they are the whole pool), and only exact similarities are kept and returned."""
    found, scores = [], []
    k = min(k + 1, total)
    rescore = approximate(index)
    if rescore and pool is None:
        if first != 0 or len(rows) != total:
            raise ValueError("a part searched against an approximate index needs the whole pool to rescore from")
        pool = rows
    lowest = threshold - index.rescore_margin if rescore else threshold
    with progress(total=len(rows), desc="kNN graph", unit="vec", leave=False) as bar:
        for start, batch in rows.batches():
            sims, ids = index.search(batch, k)
            rows_of = np.repeat(np.arange(first + start, first + start + len(ids)), k).reshape(len(ids), k)
            keep = (sims >= lowest) & (ids >= 0) & (ids != rows_of)
            pairs, similarity = np.stack([rows_of[keep], ids[keep]], axis=1), sims[keep]
            if rescore:
                similarity = exact_similarities(batch, pairs[:, 0] - first - start, pool, pairs[:, 1])
                pairs, similarity = pairs[similarity >= threshold], similarity[similarity >= threshold]
            found.append(pairs)
            scores.append(similarity)
            bar.update(len(ids))
    pairs = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), dtype=np.int64)
    return merge_pairs(pairs, np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32))


def exact_similarities(batch: np.ndarray, local: np.ndarray, pool: Rows, others: np.ndarray) -> np.ndarray:
    """Cosine similarity of batch[local[i]] and pool row others[i], in float32, the pool rows gathered in chunks
    within a quarter of a streamed pool's memory budget."""
    out = np.empty(len(local), dtype=np.float32)
    chunk = sample_cap(pool, 65_536, 0.25)
    order = np.argsort(others, kind="stable")
    for lo in range(0, len(order), chunk):
        part = order[lo : lo + chunk]
        wanted, inverse = np.unique(others[part], return_inverse=True)
        vectors = pool.take(wanted)
        out[part] = np.einsum("ij,ij->i", batch[local[part]], vectors[inverse.ravel()])
    return out


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


def deduplicate_graph(data, threshold: float, k: int = 16, exact_below: int = 200_000, nprobe: int = NPROBE):
    """deduplicate, and the graph it worked on: (kept, groups, pairs [m, 2], their similarities [m])."""
    check_threshold(threshold)
    rows = as_rows(data)
    pairs, scores = similar_pairs(rows, threshold, k, exact_below, with_scores=True, nprobe=nprobe)
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
