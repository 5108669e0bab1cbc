"""The k-means speed settings (fewer iterations, fewer sampled points per centroid) on small data: the fit stays a
valid clustering of every point, close in inertia to the default fit, and every point sits at its nearest
centroid. These settings are what makes the large-pool fit fast, so they must not break the clustering."""

import numpy as np
import pytest

from data_curation.kmeans import kmeans


def blobs(n=5_000, dim=32, centres=50, seed=0):
    """Points around `centres` random unit centres with uneven sizes, L2-normalised like embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, centres + 1) ** 0.75
    x = c[rng.choice(centres, size=n, p=weights / weights.sum())] + 0.1 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def nearest(x, centroids):
    """(nearest centroid, squared distance) by brute force in float64."""
    d = ((x[:, None, :].astype(np.float64) - centroids[None, :, :].astype(np.float64)) ** 2).sum(axis=2)
    return d.argmin(axis=1), d.min(axis=1)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("iterations, per_centroid, factor", [(10, 64, 1.15), (10, 16, 1.15), (5, 8, 1.5)])
def test_fewer_points_per_centroid_and_iterations_still_cluster_well(spherical, iterations, per_centroid, factor):
    x = blobs()
    k = 40
    default = kmeans(x, k, spherical=spherical)  # 20 iterations, 256 points per centroid: all 5,000 points
    fast = kmeans(x, k, iterations, seed=0, sample_per_centroid=per_centroid, spherical=spherical)
    assert fast.centroids.shape == (k, x.shape[1]) and np.isfinite(fast.centroids).all()
    assert fast.assignment.shape == (len(x),) and fast.assignment.min() >= 0 and fast.assignment.max() < k
    labels, distances = nearest(x, fast.centroids)
    # every point at its nearest centroid (ties within float32 rounding allowed), inertia their sum
    chosen = ((x.astype(np.float64) - fast.centroids[fast.assignment].astype(np.float64)) ** 2).sum(axis=1)
    assert np.allclose(chosen, distances, atol=1e-4)
    assert (labels == fast.assignment).mean() > 0.999
    assert np.isclose(fast.inertia, distances.sum(), rtol=1e-4)
    # on this data: 16 or more points per centroid stay within 15% of the full fit's inertia, 8 within 50%
    assert fast.inertia <= factor * default.inertia
    if spherical:
        assert np.allclose(np.linalg.norm(fast.centroids, axis=1), 1.0, atol=1e-4)
