"""Hierarchical k-means with resampling (Vo et al. 2024): level 1 clusters the points, each next level clusters
the previous level's centroids; resampling steps re-fit each level's centroids on the points closest to the
current centroids (a balanced sample), so that dense regions do not swallow the centroids.

Centroids are fitted on a sample of at most `sample_per_centroid` points per cluster; every point is then
assigned in one streamed pass, so a pool read shard by shard never sits whole in memory. The fit is Lloyd's
algorithm as faiss runs it (its initial points, its split of empty clusters, unit centroids when spherical), with
the sums of each iteration kept here: one process or the tasks of a job (distributed_kmeans) run the same code,
each on its share of the rows, with the per-centroid sums and counts added up over the processes by a `group`
(for one process, `ALONE`: nothing to add)."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import logging

import numpy as np

from data_curation.embeddings import ArrayRows, Rows, as_rows, contiguous_runs, sample_cap
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)


@dataclass
class Level:
    centroids: np.ndarray  # [k, D]
    assignment: np.ndarray  # [n] cluster of each input row of this level
    distances: np.ndarray  # [n] squared distance of each row to its centroid
    inertia: float  # the sum of `distances`


class Alone:
    """The collectives of a k-means run by one process, each the identity. A job's tasks use a group with the same
    methods over torch.distributed (distributed_kmeans.TaskGroup)."""

    rank, size = 0, 1
    gpu_device: Optional[int] = None  # with gpu: None, every GPU of the machine; a number, that GPU only

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of `array` over the processes (the same shape and dtype on each)."""
        return array

    def gather(self, value) -> list:
        """Every process's value, in rank order, on every process."""
        return [value]

    def collect(self, value) -> Optional[list]:
        """Every process's value, in rank order, on rank 0; None on the others."""
        return [value]

    def barrier(self) -> None:
        pass


ALONE = Alone()
FITS = ("lloyd", "swaps")  # kmeans(fit=): Lloyd as faiss runs it, or swap_kmeans
FIT_DEFAULTS = {"lloyd": (20, 256), "swaps": (6, 10)}  # `cluster`'s (iterations, sample per centroid) of each fit


@dataclass
class Share:
    """The rows one process holds of a k-means over rows spread across processes: rows start .. start + len(rows)
    of `total`. One process holds all of them."""

    rows: Rows
    start: int
    total: int

    @property
    def stop(self) -> int:
        return self.start + len(self.rows)


def as_share(data) -> Share:
    if isinstance(data, Share):
        return data
    rows = as_rows(data)
    return Share(rows, 0, len(rows))


def spread(rows: ArrayRows, group=ALONE) -> Share:
    """Rows every process holds (a level's centroids, the points of the next level), cut into one contiguous
    share per process."""
    if group.size == 1:
        return Share(rows, 0, len(rows))
    start, stop = contiguous_runs(len(rows), group.size)[group.rank]
    return Share(rows.slice(start, stop), start, len(rows))


def nearest_centroids(batch: np.ndarray, centroids: np.ndarray, norms: np.ndarray, chunk: int = None):
    """(nearest centroid, squared distance) of each row of a float32 batch, as |x|^2 - 2 x.c + |c|^2 from one
    matrix product per chunk of rows. numpy's multithreaded BLAS runs this product about three times faster than
    faiss's flat index search on CPU, and for k in the thousands the product is nearly all of the assignment."""
    return two_nearest(batch, centroids, norms, chunk, second=False)[:2]


def two_nearest(batch: np.ndarray, centroids: np.ndarray, norms: np.ndarray, chunk: int = None,
                second: bool = True):
    """(nearest centroid, its squared distance, second nearest, its squared distance) of each row of a float32
    batch, from one matrix product per chunk of rows (nearest_centroids); without `second`, (nearest, distance)
    alone. With one centroid the second nearest is the first."""
    chunk = chunk or max(256, min(8192, 2**25 // max(1, len(centroids))))  # scores of a chunk: at most 128 MiB
    n = len(batch)
    first, near = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
    if second:
        runner_up, far = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        x = batch[start : start + chunk]
        rows, span = np.arange(len(x)), slice(start, start + len(x))
        scores = x @ centroids.T
        scores *= -2.0
        scores += norms
        own = np.einsum("ij,ij->i", x, x)
        first[span] = scores.argmin(axis=1)
        near[span] = np.maximum(scores[rows, first[span]] + own, 0.0)  # rounding can make a zero distance negative
        if not second:
            continue
        if len(centroids) == 1:
            runner_up[span], far[span] = first[span], near[span]
            continue
        scores[rows, first[span]] = np.inf
        runner_up[span] = scores.argmin(axis=1)
        far[span] = np.maximum(scores[rows, runner_up[span]] + own, 0.0)
    return (first, near, runner_up, far) if second else (first, near)


def check_gpu_faiss() -> None:
    """--gpu needs a faiss built with CUDA (the gpu extra) that sees a GPU."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        raise InputError("--gpu: the installed faiss is a CPU build; install the gpu extra (pip install "
                         "'distill[gpu]', then pip uninstall faiss-cpu) or leave out --gpu")
    if faiss.get_num_gpus() == 0:
        raise InputError("--gpu: faiss sees no GPU on this machine; run where one is visible or leave out --gpu")


def _gpu_index(centroids: np.ndarray, device: Optional[int]):
    """A faiss flat index of the centroids on every GPU (device None) or on one; (index, resources to keep)."""
    import faiss

    check_gpu_faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    if device is None:
        index = faiss.index_cpu_to_all_gpus(index)
        resources = None
    else:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, device, index)
    index.add(centroids)
    return index, resources


def assign(rows: Rows, centroids: np.ndarray, gpu: bool = False, desc: str = "assign", device: Optional[int] = None):
    """(nearest centroid, squared distance) of every row, one batch at a time: on the GPU through faiss (every GPU,
    or `device`), on the CPU through `nearest_centroids`."""
    if centroids.ndim != 2 or centroids.shape[1] != rows.dim:
        raise InputError(f"rows of dimension {rows.dim} cannot be assigned to centroids of shape "
                         f"{list(centroids.shape)}: they come from different models")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if gpu:
        index, _resources = _gpu_index(centroids, device)
    else:
        norms = np.einsum("ij,ij->i", centroids, centroids)
    labels = np.empty(len(rows), dtype=np.int64)
    distances = np.empty(len(rows), dtype=np.float32)
    with progress(total=len(rows), desc=desc, unit="vec", leave=False) as bar:
        for start, batch in rows.batches():
            if gpu:
                d, i = index.search(np.ascontiguousarray(batch, dtype=np.float32), 1)
                i, d = i[:, 0], d[:, 0]
            else:
                i, d = nearest_centroids(np.ascontiguousarray(batch, dtype=np.float32), centroids, norms)
            labels[start : start + len(batch)], distances[start : start + len(batch)] = i, d
            bar.update(len(batch))
    return labels, distances


def faiss_permutation(n: int, seed: int) -> np.ndarray:
    """faiss's random permutation of range(n) for a seed (faiss.rand_perm): the initial centroids of its k-means
    are the first k points of the permutation with seed + 1, and so are ours."""
    import faiss

    if n >= 2**31:
        raise InputError(f"cannot fit k-means on {n} points at once (the initial centroids are drawn among at most "
                         "2^31): lower --sample-per-centroid")
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm.astype(np.int64)


def _unit(centroids: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", centroids, centroids))
    return (centroids / np.maximum(norms, 1e-20)[:, None]).astype(np.float32)


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, points: int) -> int:
    """faiss's rule (Clustering.cpp, split_clusters), in place: each empty cluster takes a copy of a cluster drawn
    with probability (size - 1) / (points - k), the two pulled apart by a relative 1/1024; the draws come from a
    Mersenne twister seeded with 1234 at every call, as faiss's, so every process takes the same decisions.
    Returns the number of clusters split."""
    k = len(centroids)
    sizes = counts.astype(np.float64)
    eps = 1.0 / 1024
    odd = np.arange(centroids.shape[1]) % 2 == 1
    up = np.where(odd, 1 - eps, 1 + eps).astype(np.float32)
    down = np.where(odd, 1 + eps, 1 - eps).astype(np.float32)
    twister = np.random.RandomState(1234)
    split = 0
    for empty in np.flatnonzero(sizes == 0):
        source = 0
        while True:
            if points > k:
                chance = np.float32((sizes[source] - 1.0) / (points - k))
            else:  # faiss divides by zero here: any cluster of two or more points is taken
                chance = np.inf if sizes[source] > 1 else -1.0
            if np.float32(twister.randint(0, 2**32, dtype=np.uint64)) / np.float32(4294967295.0) < chance:
                break
            source = (source + 1) % k
        centroids[empty] = centroids[source] * up
        centroids[source] = centroids[source] * down
        sizes[empty] = sizes[source] / 2
        sizes[source] -= sizes[empty]
        split += 1
    return split


class _Nearest:
    """The nearest centroid of each training point, once per iteration: numpy on the CPU (nearest_centroids), or one
    faiss GPU index (every GPU, or `device`) refilled with each iteration's centroids."""

    def __init__(self, gpu: bool, device: Optional[int]) -> None:
        self.gpu, self.device, self.index = gpu, device, None

    def __call__(self, train: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        if not self.gpu:
            return nearest_centroids(train, centroids, np.einsum("ij,ij->i", centroids, centroids))[0]
        if self.index is None:
            self.index, self.resources = _gpu_index(centroids, self.device)
        else:
            self.index.reset()
            self.index.add(centroids)
        return self.index.search(train, 1)[1][:, 0]


def cluster_sums(train: np.ndarray, labels: np.ndarray, k: int,
                 chunk: int = 65_536) -> Tuple[np.ndarray, np.ndarray]:
    """(float64 sum, count) of the rows of each cluster: per chunk of rows, the rows sorted by cluster and summed in
    that order (np.add.reduceat), so that the sums do not depend on how the rows are split."""
    sums = np.zeros((k, train.shape[1]), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    for start in range(0, len(train), chunk):
        part = labels[start : start + chunk]
        order = np.argsort(part, kind="stable")
        ordered = part[order]
        clusters, first = np.unique(ordered, return_index=True)
        sums[clusters] += np.add.reduceat(train[start : start + chunk][order].astype(np.float64), first, axis=0)
        counts[clusters] += np.diff(np.append(first, len(ordered)))
    return sums, counts


def recentred(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray, group=ALONE):
    """(centroids moved to the mean of their points, the points of each) from this process's float64 sums and counts
    (cluster_sums), added up over the group; a cluster with no point keeps its centroid."""
    sums, counts = group.sum(sums), group.sum(counts)
    filled = counts > 0
    centroids = centroids.copy()
    centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return centroids, counts


def gathered_rows(train: np.ndarray, offset: int, picks: np.ndarray, group=ALONE) -> np.ndarray:
    """float32 rows at positions `picks` among the points spread over the group (this process holds offset ..
    offset + len(train)), on every process: each row comes from the one process holding it."""
    mine = (picks >= offset) & (picks < offset + len(train))
    out = np.zeros((len(picks), train.shape[1]), dtype=np.float64)
    out[mine] = train[picks[mine] - offset]
    return group.sum(out).astype(np.float32)


def lloyd(train: np.ndarray, offset: int, total: int, k: int, iterations: int, seed: int,
          init: Optional[np.ndarray] = None, spherical: bool = True, gpu: bool = False, group=ALONE,
          resume: Optional[Tuple[int, np.ndarray]] = None,
          on_iteration: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """Centroids of Lloyd's k-means over training points spread across the processes of `group`: this process
    holds points offset .. offset + len(train) of `total`. Without `init` the first centroids are the points
    faiss would pick (see faiss_permutation); each iteration assigns the points, adds up the per-centroid sums
    and counts over the processes (float64), re-centres, splits empty clusters (split_empty_clusters) and, when
    spherical, scales to unit length. `resume` = (iterations done, centroids then) continues an interrupted fit;
    on_iteration(iterations done, centroids) is called after each iteration."""
    if resume is not None:
        done, centroids = resume[0], np.array(resume[1], dtype=np.float32)
    else:
        done = 0
        if init is None:
            centroids = gathered_rows(train, offset, faiss_permutation(total, seed + 1)[:k], group)
        else:
            centroids = np.array(init, dtype=np.float32)
        if spherical:
            centroids = _unit(centroids)
    nearest = _Nearest(gpu, group.gpu_device)
    for iteration in range(done, iterations):
        sums, counts = cluster_sums(train, nearest(train, centroids) if len(train) else np.zeros(0, np.int64), k)
        centroids, counts = recentred(centroids, sums, counts, group)
        split_empty_clusters(centroids, counts, total)
        if spherical:
            centroids = _unit(centroids)
        if on_iteration is not None:
            on_iteration(iteration + 1, centroids)
    return centroids


def kmeans(data, k: int, iterations: int = 20, seed: int = 0, init: np.ndarray = None, gpu: bool = False,
           sample_per_centroid: int = 256, subset: np.ndarray = None, spherical: bool = True, group=ALONE,
           resume: Optional[Tuple[int, np.ndarray]] = None,
           on_iteration: Optional[Callable[[int, np.ndarray], None]] = None, fit: str = "lloyd") -> Level:
    """k-means of the rows (or of rows[subset]), then every row assigned to its nearest centroid. Spherical
    (unit centroids, as for cosine embeddings) unless told otherwise. `data` may be this process's Share of rows
    spread over a group's processes: `subset` holds positions among all of them, and the Level holds the
    assignment of this process's rows (its inertia: of all rows). `fit`: "lloyd" (faiss's k-means), or "swaps"
    (swap_kmeans: for many clusters, Lloyd with local-search swaps on a small sample, refined on every row)."""
    if fit not in FITS:
        raise InputError(f"unknown k-means fit {fit!r}: choose one of {', '.join(FITS)}")
    share = as_share(data)
    train, first, total = training_sample(share, k, sample_per_centroid, seed, subset, group)
    if fit == "swaps" and init is None:  # a fit from given centroids (resampling) stays Lloyd's
        return swap_kmeans(share, train, first, total, k, iterations, seed, spherical, gpu, group)
    centroids = lloyd(train, first, total, k, iterations, seed, init, spherical, gpu, group, resume, on_iteration)
    labels, distances = assign(share.rows, centroids, gpu, desc=f"assign to {k}", device=group.gpu_device)
    inertia = group.sum(np.array([distances.astype(np.float64).sum()]))[0]
    return Level(centroids, labels, distances, float(inertia))


def training_sample(share: Share, k: int, sample_per_centroid: int, seed: int, subset: Optional[np.ndarray],
                    group=ALONE) -> Tuple[np.ndarray, int, int]:
    """The points a fit of k centroids trains on: at most `sample_per_centroid` x k of the rows (or of
    rows[subset]), drawn with the seed among every process's rows, so that each process draws the same sample and
    takes the part it holds. (this process's float32 points, position of its first among all, count of all)."""
    rows = share.rows
    pool = share.total if subset is None else len(subset)
    if not 1 <= k <= pool:
        raise InputError(f"cannot make {k} clusters of {pool} points: choose between 1 and {pool}")
    rng = np.random.default_rng(seed)
    chosen = np.arange(share.total) if subset is None else np.asarray(subset)
    cap = sample_cap(rows, sample_per_centroid * k)
    if cap < min(len(chosen), sample_per_centroid * k) and group.rank == 0:
        logger.info("fitting %d centroids on %d points (%.0f per centroid) to stay within the memory budget",
                    k, cap, cap / k)
    if len(chosen) > cap:
        chosen = np.sort(rng.choice(chosen, size=max(cap, k), replace=False))
    first, last = np.searchsorted(chosen, [share.start, share.stop])
    train = rows.take(chosen[first:last] - share.start)
    return np.ascontiguousarray(train, dtype=np.float32), int(first), len(chosen)


def _drawn_swaps(train: np.ndarray, offset: int, total: int, near: np.ndarray, far: np.ndarray,
                 labels: np.ndarray, second: np.ndarray, centroids: np.ndarray, draws: int,
                 rng: np.random.Generator, group=ALONE) -> int:
    """One local-search step of k-means (Lattanzi and Sohler 2019, "A better k-means++ algorithm via local search",
    here a batch of swaps at once), in place on `centroids`: `draws` training points drawn with probability
    proportional to their squared distance to their centroid (`near`, as k-means++ draws), each one's gain as a new
    centroid (the sum over the training points of how much closer it would be) and each centroid's cost of removal
    (the sum over its points of the step to their second nearest, `far - near`); a drawn point that another drawn
    point of larger gain would take over is dropped, and a centroid whose cost counts on one already replaced (the
    second nearest of its points, or the other way round) is not replaced in the same step; then the best gains
    replace the cheapest centroids while the gain exceeds the cost. The distances are those of the assignment that
    gave `labels`. Every decision is taken from summed or gathered values (float64), so every process of a group
    takes the same. Returns the number of centroids replaced."""
    k = len(centroids)
    mass = np.concatenate(group.gather(near.astype(np.float64)))
    if mass.sum() <= 0 or k < 2:
        return 0
    picks = np.sort(rng.choice(total, size=min(draws, int((mass > 0).sum())), replace=False, p=mass / mass.sum()))
    drawn = gathered_rows(train, offset, picks, group)
    drawn_norms = np.einsum("ij,ij->i", drawn, drawn)
    gain = np.zeros(len(picks), dtype=np.float64)
    chunk = max(256, 2**22 // len(picks))  # [chunk, draws] float32 temporaries of at most 16 MiB
    for start in range(0, len(train), chunk):
        x = train[start : start + chunk]
        closer = (x @ drawn.T) * 2.0
        closer -= drawn_norms
        closer -= np.einsum("ij,ij->i", x, x)[:, None]
        closer += near[start : start + chunk, None]  # near - |x - y|^2
        gain += np.maximum(closer, 0.0).sum(axis=0, dtype=np.float64)
    gain = group.sum(gain)
    cost = group.sum(np.bincount(labels, weights=(far - near).astype(np.float64), minlength=k))
    wide = drawn.astype(np.float64)
    between = np.einsum("ij,ij->i", wide, wide)
    between = between[:, None] + between[None, :] - 2.0 * (wide @ wide.T)
    own = mass[picks]  # each drawn point's squared distance to its centroid
    kept: List[int] = []
    for i in np.argsort(-gain, kind="stable"):
        if gain[i] <= 0:
            break
        if not kept or between[i, kept].min() >= own[i]:  # not taken over by a kept point of larger gain
            kept.append(int(i))
    pairs = np.unique(np.concatenate(group.gather(np.unique(labels * k + second))))
    first_of, second_of = pairs // k, pairs % k
    linked = np.zeros(k, dtype=bool)
    swapped = 0
    for victim in np.argsort(cost, kind="stable"):
        if swapped == len(kept) or gain[kept[swapped]] <= cost[victim]:
            break
        if linked[victim]:
            continue
        centroids[victim] = drawn[kept[swapped]]
        linked[second_of[first_of == victim]] = True
        linked[first_of[second_of == victim]] = True
        swapped += 1
    return swapped


def swap_kmeans(share: Share, train: np.ndarray, first: int, total: int, k: int, iterations: int, seed: int,
                spherical: bool = True, gpu: bool = False, group=ALONE, refine: int = 2,
                draws: Optional[int] = None) -> Level:
    """k-means for many clusters on a small sample, then refined on every row (`kmeans(fit="swaps")`):
    Lloyd's iterations on the training sample from faiss's initial points, each but the last followed by a batch of
    local-search swaps (_drawn_swaps, `draws` = k / 10 drawn points by default, at most 4,096, measured with the
    iteration's assignment, before re-centring) that move centroids from where they crowd to where points are far
    from any; then one pass over every row finds its two nearest centroids, and
    `refine` rounds re-centre the centroids on every row assigned to them and move each row to the nearer of its two.
    Lloyd from random points leaves dense regions with several centroids and sparse ones with none, which only the
    swaps undo; a sample of 10 points per centroid is enough for them, and the rounds on every row give the
    centroids of small clusters the points the sample missed. The assignment is the nearer of each row's two
    nearest centroids of the full pass; `distances` and `inertia` are measured to the returned centroids. The sample
    iterations run on the CPU (their products are small); with `gpu`, the pass over every row runs on faiss."""
    rng = np.random.default_rng(seed)
    draws = min(max(1, k // 10), 4096) if draws is None else draws
    centroids = gathered_rows(train, first, faiss_permutation(total, seed + 1)[:k], group)
    if spherical:
        centroids = _unit(centroids)
    with progress(total=iterations, desc=f"fit {k} with swaps", unit="it", leave=False) as bar:
        for iteration in range(iterations):
            labels, near, second, far = two_nearest(train, centroids, np.einsum("ij,ij->i", centroids, centroids))
            centroids, counts = recentred(centroids, *cluster_sums(train, labels, k), group)
            split_empty_clusters(centroids, counts, total)
            if iteration < iterations - 1:
                swapped = _drawn_swaps(train, first, total, near, far, labels, second, centroids, draws, rng, group)
                logger.debug("iteration %d: %d centroids moved by swaps", iteration + 1, swapped)
            if spherical:
                centroids = _unit(centroids)
            bar.update(1)
    return _refined(share.rows, centroids, refine, spherical, gpu, group, f"assign to {k}")


def _refined(rows: Rows, centroids: np.ndarray, rounds: int, spherical: bool, gpu: bool, group=ALONE,
             desc: str = "assign") -> Level:
    """Every row's two nearest centroids (one exact pass), then `rounds` of: centroids re-centred on every row
    assigned to them (float64 sums over the processes; an empty cluster keeps its centroid), each row moved to the
    nearer of its two."""
    k = len(centroids)
    labels, other = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
    distances = np.empty(len(rows), dtype=np.float32)
    norms = np.einsum("ij,ij->i", centroids, centroids)
    index, _resources = _gpu_index(centroids, group.gpu_device) if gpu else (None, None)
    sums, counts = np.zeros((k, rows.dim)), np.zeros(k, dtype=np.int64)
    with progress(total=len(rows) * (rounds + 1), desc=desc, unit="vec", leave=False) as bar:
        for start, batch in rows.batches():
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            span = slice(start, start + len(batch))
            if index is not None:
                d, i = index.search(batch, min(2, k))
                labels[span], distances[span], other[span] = i[:, 0], np.maximum(d[:, 0], 0), i[:, -1]
            else:
                labels[span], distances[span], other[span], _ = two_nearest(batch, centroids, norms)
            if rounds:
                s, c = cluster_sums(batch, labels[span], k)
                sums += s
                counts += c
            bar.update(len(batch))
        for round_ in range(rounds):
            centroids = recentred(centroids, sums, counts, group)[0]
            if spherical:
                centroids = _unit(centroids)
            sums, counts = np.zeros((k, rows.dim)), np.zeros(k, dtype=np.int64)
            for start, batch in rows.batches():
                batch = np.ascontiguousarray(batch, dtype=np.float32)
                span = slice(start, start + len(batch))
                mine, alternative = labels[span], other[span]
                step = batch - centroids[mine]
                d_mine = np.einsum("ij,ij->i", step, step)
                step = batch - centroids[alternative]
                d_other = np.einsum("ij,ij->i", step, step)
                move = d_other < d_mine
                labels[span] = np.where(move, alternative, mine)
                other[span] = np.where(move, mine, alternative)
                distances[span] = np.minimum(d_mine, d_other)
                if round_ < rounds - 1:
                    s, c = cluster_sums(batch, labels[span], k)
                    sums += s
                    counts += c
                bar.update(len(batch))
    inertia = group.sum(np.array([distances.astype(np.float64).sum()]))[0]
    return Level(centroids, labels, distances, float(inertia))


def nearest_in_each_cluster(rows: np.ndarray, clusters: np.ndarray, distances: np.ndarray, count: int) -> np.ndarray:
    """The rows (positions into clusters / distances), up to `count` per cluster, nearest their centroid first;
    sorted. One sort, not one scan per cluster."""
    order = rows[np.lexsort((distances[rows], clusters[rows]))]
    ordered = clusters[order]
    first = np.searchsorted(ordered, ordered, side="left")  # start of each row's cluster in the order
    return np.sort(order[np.arange(len(order)) - first < count])


def closest_per_cluster(level: Level, per_cluster: int, start: int = 0, group=ALONE) -> np.ndarray:
    """Positions of up to per_cluster rows nearest each centroid. Over a group: the level holds the rows
    start .. of this process; each process's nearest rows of each cluster are gathered, and the nearest of those
    (ties to the earlier row, as for one process) are the positions among all processes' rows."""
    local = nearest_in_each_cluster(np.arange(len(level.assignment)), level.assignment, level.distances, per_cluster)
    if group.size == 1:
        return local + start
    found = group.gather((local + start, level.assignment[local], level.distances[local]))
    positions, clusters, distances = (np.concatenate([part[i] for part in found]) for i in range(3))
    return positions[nearest_in_each_cluster(np.arange(len(positions)), clusters, distances, per_cluster)]


def resample(data, level: Level, per_cluster: int, iterations: int, seed: int, gpu: bool = False,
             sample_per_centroid: int = 256, group=ALONE, resume=None, on_iteration=None) -> Level:
    """Re-fit the centroids on up to per_cluster points nearest each centroid, then reassign every point."""
    share = as_share(data)
    subset = closest_per_cluster(level, per_cluster, share.start, group)
    k = min(len(level.centroids), len(subset))
    return kmeans(share, k, iterations, seed, init=level.centroids[:k], gpu=gpu,
                  sample_per_centroid=sample_per_centroid, subset=subset, group=group, resume=resume,
                  on_iteration=on_iteration)


def collect_level(level: Level, group=ALONE) -> Optional[Level]:
    """The level with the assignment and distances of every process's rows, on rank 0 (None elsewhere)."""
    if group.size == 1:
        return level
    parts = group.collect((level.assignment, level.distances))
    if parts is None:
        return None
    return Level(level.centroids, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 level.inertia)


def share_of(level: Level, share: Share) -> Level:
    """This process's rows of a level that holds every row (one read back from a checkpoint)."""
    return Level(level.centroids, level.assignment[share.start : share.stop],
                 level.distances[share.start : share.stop], level.inertia)


class Checkpoints:
    """Where a hierarchical k-means keeps its progress (distributed_kmeans.ClusterState writes files); this one
    keeps nothing. Stages of a level: 0 the k-means, s >= 1 resampling step s; a stage's level holds every row."""

    def stage(self, number: int) -> Optional[Tuple[int, Level]]:
        """(last stage done, its level) of level `number` (0-based), or None."""
        return None

    def fit(self, number: int, stage: int) -> Optional[Tuple[int, np.ndarray]]:
        """(iterations done, centroids) of the fit of that stage, when it was interrupted."""
        return None

    def on_iteration(self, number: int, stage: int) -> Optional[Callable[[int, np.ndarray], None]]:
        return None

    def save(self, number: int, stage: int, level: Optional[Level], last: bool) -> None:
        """A stage done (`level`: every row, on rank 0; None on the others); `last`: the level is finished."""


def hierarchical_kmeans(data, clusters: Sequence[int], iterations: int = 20, resampling_steps: int = 0,
                        per_cluster: int = 10, seed: int = 0, gpu: bool = False,
                        sample_per_centroid: int = 256, group=ALONE,
                        checkpoints: Optional[Checkpoints] = None, fit: str = "lloyd") -> List[Level]:
    """Levels from fine to coarse: clusters[0] clusters the points, clusters[i] the centroids of level i - 1.
    Over a group, `data` is this process's Share of the points; every level's centroids are cut into shares in
    turn (spread), and the levels returned hold every row on rank 0, this process's rows elsewhere. With
    `checkpoints`, finished stages are read back instead of computed again."""
    if not len(clusters) or any(b > a for a, b in zip(clusters, clusters[1:])):
        raise InputError(f"cluster counts go from fine to coarse (non-increasing), got {list(clusters)}")
    if per_cluster < 1 or resampling_steps < 0 or iterations < 1:
        raise InputError("--per-cluster and --iterations must be positive, --resampling-steps not negative")
    checkpoints = checkpoints or Checkpoints()
    levels: List[Level] = []
    share = as_share(data)
    for number, k in enumerate(clusters):
        saved = checkpoints.stage(number)
        if saved is not None:
            done, whole = saved
            level = share_of(whole, share)
        else:
            done = 0
            level = kmeans(share, k, iterations, seed + number, gpu=gpu, sample_per_centroid=sample_per_centroid,
                           group=group, resume=checkpoints.fit(number, 0),
                           on_iteration=checkpoints.on_iteration(number, 0), fit=fit)
            whole = collect_level(level, group)
            checkpoints.save(number, 0, whole, resampling_steps == 0)
        for step in range(done + 1, resampling_steps + 1):
            level = resample(share, level, per_cluster, iterations, seed + 100 * step + number, gpu,
                             sample_per_centroid, group, checkpoints.fit(number, step),
                             checkpoints.on_iteration(number, step))
            whole = collect_level(level, group)
            checkpoints.save(number, step, whole, step == resampling_steps)
        levels.append(whole if group.rank == 0 else level)
        share = spread(as_rows(level.centroids), group)
    return levels


def leaf_of_top(levels: List[Level]) -> List[np.ndarray]:
    """For each level, the cluster of every point (row of the input) at that level."""
    paths, current = [], levels[0].assignment
    paths.append(current)
    for level in levels[1:]:
        current = level.assignment[current]
        paths.append(current)
    return paths
