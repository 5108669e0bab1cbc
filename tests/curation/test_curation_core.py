"""The curation steps' logic on small synthetic data: shards, deduplication, hierarchical k-means, balanced
sampling, retrieval, and bad input."""

import numpy as np
import pytest

from data_curation.dedup import connected_components, deduplicate, far_from
from data_curation.embeddings import EmbeddingStore, valid_mask
from data_curation.kmeans import hierarchical_kmeans, leaf_of_top
from data_curation.retrieval import retrieve
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
    ids = retrieve(x[seed_rows], x, n=4)
    assert ids.shape == (8, 4) and (labels[ids] == labels[seed_rows][:, None]).all()
    assert (ids[:, 0] == seed_rows).all()
    with pytest.raises(InputError, match="dimension"):
        retrieve(x[:2, :8], x)
