"""The curation steps' logic on small synthetic data: shards, deduplication, hierarchical k-means, balanced
sampling, retrieval, and bad input."""

import numpy as np
import pytest

from data_curation.dedup import connected_components, deduplicate, far_from
from data_curation.embeddings import ArrayRows, EmbeddingStore, StoreRows, select, valid_mask
from data_curation.kmeans import Level, closest_per_cluster, hierarchical_kmeans, leaf_of_top
from data_curation.retrieval import retrieve, same_cluster
from data_curation.sampling import balanced_sample, split_evenly
from distill.errors import InputError


def clustered(n_clusters=8, per=50, dim=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(n_clusters), per)


def test_store_writes_shards_resumes_and_streams(tmp_path):
    store = EmbeddingStore(tmp_path / "emb")
    x, _ = clustered(per=10)
    store.append(x[:30], [f"img{i}.png" for i in range(30)])
    store.append(x[30:], [f"img{i}.png" for i in range(30, 80)])
    again = EmbeddingStore(tmp_path / "emb")  # a second process sees what was written
    assert len(again) == 80 and again.dim == 16 and again.paths()[-1] == "img79.png"
    assert [start for start, _ in again.shards()] == [0, 30]
    assert np.allclose(again.load(), x, atol=1e-2)  # float16 on disk
    with pytest.raises(InputError, match="memory budget"):
        again.load(max_bytes=100)
    with pytest.raises(InputError, match="dimension 8"):
        again.append(np.zeros((2, 8)), ["a", "b"])
    assert len(EmbeddingStore(tmp_path / "emb")) == 80  # the refused write changed nothing


def test_nan_and_zero_vectors_are_found():
    x = np.ones((4, 3), dtype=np.float32)
    x[1, 0], x[2] = np.nan, 0
    assert valid_mask(x).tolist() == [True, False, False, True]
    with pytest.raises(InputError, match="NaN, inf or zero"):
        deduplicate(x, 0.9)


def test_dedup_finds_injected_copies_and_keeps_one_per_group():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 32)).astype(np.float32)
    copies = base[:40] + 0.01 * rng.normal(size=(40, 32)).astype(np.float32)
    x = np.concatenate([base, copies])
    kept, groups = deduplicate(x, threshold=0.95)
    assert len(kept) == 200 and set(kept) == set(range(200))  # the originals come first and stay
    assert sorted(sorted(g) for g in groups) == [[i, 200 + i] for i in range(40)]
    assert connected_components(4, np.array([[0, 1], [1, 2]])).tolist() == [0, 0, 0, 3]
    assert far_from(x[:10], x[:3], 0.95).tolist() == list(range(3, 10))


def test_hierarchical_kmeans_and_balanced_sampling_flatten_a_long_tail():
    rng = np.random.default_rng(2)
    sizes = [400, 100, 40, 20, 10, 4]
    centers = rng.normal(size=(len(sizes), 16)) * 3
    x = np.concatenate([c + 0.1 * rng.normal(size=(s, 16)) for c, s in zip(centers, sizes)]).astype(np.float32)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    levels = hierarchical_kmeans(x, [24, 6], iterations=20, resampling_steps=1, per_cluster=5)
    assert [len(level.centroids) for level in levels] == [24, 6]
    paths = leaf_of_top(levels)
    sample = balanced_sample(paths, 60, seed=0)
    assert len(sample) == 60 and len(set(sample)) == 60
    counts = np.bincount(labels[sample], minlength=len(sizes))
    random = np.bincount(labels[rng.choice(len(x), 60, replace=False)], minlength=len(sizes))
    entropy = lambda c: float(-(c[c > 0] / c.sum() * np.log(c[c > 0] / c.sum())).sum())  # noqa: E731
    assert entropy(counts) > entropy(random) + 0.2  # closer to uniform than a random sample
    assert counts.min() >= 1 and counts.max() < random.max()  # every class present, the head cut down
    with pytest.raises(InputError, match="clusters of"):
        hierarchical_kmeans(x[:5], [10])
    with pytest.raises(InputError, match="non-increasing"):
        hierarchical_kmeans(x, [6, 24])


def test_even_shares_respect_capacities():
    assert split_evenly(10, [1, 100, 100]) == [1, 5, 4] or split_evenly(10, [1, 100, 100]) == [1, 4, 5]
    assert split_evenly(7, [2, 2, 2]) == [2, 2, 2]
    assert sum(split_evenly(50, [3, 40, 7, 0])) == 50


def test_retrieval_returns_nearest_pool_images():
    x, labels = clustered()
    seed_rows = np.arange(0, 400, 50)  # one seed per cluster
    ids, sims = retrieve(x[seed_rows], x, n=4)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert ids.shape == (8, 4) and (labels[ids] == labels[seed_rows][:, None]).all()
    assert (ids[:, 0] == seed_rows).all()
    with pytest.raises(InputError, match="dimension"):
        retrieve(x[:2, :8], x)


def _store(tmp_path, x, shard=100):
    store = EmbeddingStore(tmp_path / "emb")
    for start in range(0, len(x), shard):
        store.append(x[start : start + shard], [f"img{i}.png" for i in range(start, min(len(x), start + shard))])
    return store


def test_streamed_rows_give_what_rows_in_memory_give(tmp_path):
    """Over the memory budget the pool is read shard by shard; dedup, k-means and retrieval answer the same, and
    no step holds more than a shard or a fitting sample at once."""
    rng = np.random.default_rng(3)
    x, labels = clustered(n_clusters=10, per=60, dim=24, spread=0.3)
    x = np.concatenate([x, x[:50] + 0.002 * rng.normal(size=(50, 24)).astype(np.float32)])  # 50 near-copies
    _store(tmp_path, x, shard=100)
    memory, names = select(tmp_path / "emb", memory_gb=1.0)
    streamed, same_names = select(tmp_path / "emb", memory_gb=50_000 / 2**30)  # float32 takes 62,400 bytes
    tight, _ = select(tmp_path / "emb", memory_gb=20_000 / 2**30)  # 8-bit codes do not fit: product-quantised
    assert isinstance(memory, ArrayRows) and isinstance(streamed, StoreRows) and names == same_names
    assert np.allclose(streamed.take(np.array([649, 3, 99, 100])), memory.take(np.array([649, 3, 99, 100])))

    largest = []
    original_take = StoreRows.take
    def spy(self, positions):
        largest.append(len(positions))
        return original_take(self, positions)
    StoreRows.take = spy
    try:
        kept_m, groups_m = deduplicate(memory, 0.99)
        kept_s, groups_s = deduplicate(streamed, 0.99)
        kept_t, groups_t = deduplicate(tight, 0.99)
        level_m = hierarchical_kmeans(memory, [20, 5], iterations=10, sample_per_centroid=8)
        level_s = hierarchical_kmeans(streamed, [20, 5], iterations=10, sample_per_centroid=8)
        ids_m, _ = retrieve(memory.take(np.arange(0, 600, 60)), memory, 5)
        ids_s, _ = retrieve(memory.take(np.arange(0, 600, 60)), streamed, 5)
    finally:
        StoreRows.take = original_take
    assert kept_m.tolist() == kept_s.tolist() == list(range(600))
    assert sorted(map(sorted, groups_s)) == sorted(map(sorted, groups_t)) == [[i, 600 + i] for i in range(50)]
    assert kept_t.tolist() == kept_s.tolist()
    for a, b in zip(level_m, level_s):
        assert (a.assignment == b.assignment).all() and np.isclose(a.inertia, b.inertia, rtol=1e-4)
    assert (ids_m == ids_s).all()
    assert max(largest) <= 20 * 8  # k-means fitted on a sample, never the whole pool (650 rows)
    small = hierarchical_kmeans(tight, [20], iterations=5, sample_per_centroid=8)[0]  # the budget caps the sample
    assert len(small.assignment) == 650 and max(largest) <= 20 * 8


def test_closest_per_cluster_picks_the_nearest_rows_of_each_cluster():
    rng = np.random.default_rng(4)
    assignment = rng.integers(0, 7, size=300)
    distances = rng.random(300).astype(np.float32)
    level = Level(np.zeros((7, 2)), assignment, distances, float(distances.sum()))
    got = set(closest_per_cluster(level, 3).tolist())
    want = set()
    for c in range(7):
        members = np.flatnonzero(assignment == c)
        want |= set(members[np.argsort(distances[members])[:3]].tolist())
    assert got == want
    assert same_cluster(np.array([1, 1, 4]), np.array([0, 1, 4, 4, 2])).tolist() == [1, 2, 3]
    nearest = same_cluster(np.array([4]), np.array([4, 1, 4, 4, 4]), 2, np.array([0.5, 0, 0.1, 0.9, 0.2]))
    assert nearest.tolist() == [2, 4]


def test_store_refuses_bad_input(tmp_path):
    with pytest.raises(InputError, match="no embeddings"):
        select(tmp_path / "nothing", 1.0)
    store = _store(tmp_path, np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(InputError, match="no usable embeddings"):
        select(store.folder, 1.0)
