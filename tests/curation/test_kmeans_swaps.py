"""k-means with local-search swaps (`kmeans(fit="swaps")`, `cluster --fit swaps`): its parts against their
definitions on small hand-made data, the whole fit against Lloyd's on uneven clusters, and over a job's tasks against
one process."""

import numpy as np
import pytest

from data_curation.cli import build_parser, main
from data_curation.embeddings import ArrayRows
from data_curation.kmeans import FITS, _drawn_swaps, _refined, hierarchical_kmeans, kmeans, two_nearest
from distill.errors import InputError
from tests.curation.test_distributed_kmeans import levels_of_tasks, make_store
from tests.curation.test_kmeans_speed_options import blobs


def brute(x, centroids):
    """[n, k] squared distances in float64."""
    return ((x[:, None, :].astype(np.float64) - centroids[None, :, :].astype(np.float64)) ** 2).sum(axis=2)


@pytest.mark.parametrize("k", [1, 2, 37])
def test_two_nearest_are_the_two_smallest_distances(k):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    c = rng.normal(size=(k, 8)).astype(np.float32)
    first, near, second, far = two_nearest(x, c, np.einsum("ij,ij->i", c, c), chunk=64)
    d = brute(x, c)
    order = np.argsort(d, axis=1)
    assert (first == order[:, 0]).all() and np.allclose(near, d[np.arange(500), order[:, 0]], atol=1e-4)
    if k == 1:  # no second centroid: the first again
        assert (second == first).all() and np.allclose(far, near)
    else:
        assert (second == order[:, 1]).all() and np.allclose(far, d[np.arange(500), order[:, 1]], atol=1e-4)


def two_blobs(rng, dense=300, sparse=60, dim=16):
    a, b = np.zeros(dim), np.zeros(dim)
    a[0], b[1] = 1.0, 1.0
    x = np.concatenate([a + 0.05 * rng.normal(size=(dense, dim)), b + 0.05 * rng.normal(size=(sparse, dim))])
    return x.astype(np.float32), a, b


def swap_step(x, centroids, seed=0, draws=20):
    first, near, second, far = two_nearest(x, centroids, np.einsum("ij,ij->i", centroids, centroids))
    centroids = centroids.copy()
    swapped = _drawn_swaps(x, 0, len(x), near, far, first, second, centroids, draws, np.random.default_rng(seed))
    return swapped, centroids


def test_a_swap_moves_a_crowded_centroid_to_the_points_with_none():
    rng = np.random.default_rng(1)
    x, a, b = two_blobs(rng)
    # three centroids: two share the dense blob, none is near the sparse one
    crowded = np.stack([a + 0.01, a - 0.01, a + np.eye(16)[2] * 0.02]).astype(np.float32)
    swapped, after = swap_step(x, crowded)
    assert swapped == 1  # one point drawn from the sparse blob is kept; the others there would be taken over by it
    to_b = np.linalg.norm(after - b, axis=1)
    assert (to_b < 0.5).sum() == 1 and (np.linalg.norm(after - a, axis=1) < 0.1).sum() == 2
    # the centroid replaced is one whose points lose least by moving to their second nearest
    moved = np.flatnonzero((after != crowded).any(axis=1))
    assert len(moved) == 1 and to_b[moved[0]] < 0.5
    # and the swap pays: the clustering's inertia falls
    assert brute(x, after).min(axis=1).sum() < 0.5 * brute(x, crowded).min(axis=1).sum()


def test_no_swap_when_every_group_of_points_has_its_centroid():
    rng = np.random.default_rng(2)
    x, a, b = two_blobs(rng)
    swapped, after = swap_step(x, np.stack([a, b]).astype(np.float32))
    assert swapped == 0 and np.array_equal(after, np.stack([a, b]).astype(np.float32))


def test_refinement_rounds_never_raise_the_inertia_and_measure_to_the_returned_centroids():
    x = blobs(3000, 16, 60, seed=3)
    rows = ArrayRows(x, batch=700)  # several batches
    start = kmeans(x, 30, iterations=2, sample_per_centroid=8, spherical=False).centroids
    levels = [_refined(rows, start, rounds, spherical=False, gpu=False) for rounds in range(4)]
    assert (levels[0].assignment == brute(x, start).argmin(axis=1)).all()  # no round: the nearest centroid
    inertias = [level.inertia for level in levels]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(inertias, inertias[1:])) and inertias[2] < inertias[0]
    for level in levels:
        d = brute(x, level.centroids)
        assert np.allclose(level.distances, d[np.arange(len(x)), level.assignment], atol=1e-4)
        assert np.isclose(level.inertia, level.distances.astype(np.float64).sum(), rtol=1e-6)
        # every row sits at one of the two nearest centroids of the pass before the rounds
        nearest_two = np.argsort(brute(x, start), axis=1)[:, :2]
        assert (nearest_two == level.assignment[:, None]).any(axis=1).all()


@pytest.mark.parametrize("spherical", [False, True])
def test_swaps_beat_lloyd_on_the_same_small_sample_when_clusters_are_uneven(spherical):
    """Many clusters of Zipf-like sizes, fewer centroids: Lloyd from random points leaves small clusters without a
    centroid and crowds large ones; the swaps fix that on the same sample and iterations."""
    x = blobs(20_000, 32, 400, seed=0)
    lloyd = kmeans(x, 200, 6, seed=0, sample_per_centroid=10, spherical=spherical)
    swaps = kmeans(x, 200, 6, seed=0, sample_per_centroid=10, spherical=spherical, fit="swaps")
    full = kmeans(x, 200, 20, seed=0, sample_per_centroid=100, spherical=spherical)  # every point, 20 iterations
    assert swaps.inertia < 0.95 * lloyd.inertia
    assert swaps.inertia < 1.05 * full.inertia
    assert swaps.centroids.shape == (200, 32) and np.isfinite(swaps.centroids).all()
    d = brute(x, swaps.centroids)
    assert np.allclose(swaps.distances, d[np.arange(len(x)), swaps.assignment], atol=1e-4)
    assert (d.argmin(axis=1) == swaps.assignment).mean() > 0.9  # the nearer of two: nearly always the nearest
    if spherical:
        assert np.allclose(np.linalg.norm(swaps.centroids, axis=1), 1.0, atol=1e-5)


def test_an_unknown_fit_is_a_clear_error():
    with pytest.raises(InputError, match="unknown k-means fit 'elkan': choose one of lloyd, swaps"):
        kmeans(blobs(200), 4, fit="elkan")


@pytest.mark.parametrize("k", [1, 2, 150])
def test_swaps_at_the_ends_one_cluster_and_one_point_per_cluster(k):
    x = blobs(150, 8, 10, seed=6)
    level = kmeans(x, k, 4, seed=0, spherical=False, fit="swaps")
    d = brute(x, level.centroids)
    assert np.allclose(level.distances, d[np.arange(len(x)), level.assignment], atol=1e-4)
    if k == 1:
        assert np.allclose(level.centroids[0], x.astype(np.float64).mean(axis=0), atol=1e-5)
    if k == len(x):  # every point its own centroid: nothing left to gain
        assert level.inertia < 1e-6 and len(np.unique(level.assignment)) == len(x)


@pytest.mark.parametrize("cuts", [[0, 900, 2000], [0, 150, 1200, 2000], [0, 0, 1, 2000, 2000]])
def test_tasks_give_the_swaps_fit_of_one_process(cuts):
    """Uneven shares, and tasks holding one row or none (of the pool, so of every training sample)."""
    x = blobs(2000, 16, 40, seed=4)
    fit = dict(clusters=[30, 5], iterations=4, resampling_steps=1, per_cluster=5, sample_per_centroid=10,
               fit="swaps")
    one = hierarchical_kmeans(x, **fit)
    results = levels_of_tasks(x, cuts, **fit)
    for a, b in zip(one, results[0]):  # rank 0 holds every row of every level
        assert np.allclose(a.centroids, b.centroids, atol=1e-5) and (a.assignment == b.assignment).all()
        assert np.isclose(a.inertia, b.inertia, rtol=1e-6)


def test_cluster_command_fits_with_swaps(tmp_path, capsys):
    store = make_store(tmp_path / "emb", blobs(3000, 16, 60, seed=5))
    out = tmp_path / "cl"
    assert main(["cluster", "--embeddings", str(store), "--levels", "40", "8", "--fit", "swaps", "--iterations", "4",
                 "--sample-per-centroid", "10", "--output", str(out)]) == 0
    assert "3000 images in levels of 40, 8 clusters" in capsys.readouterr().out
    assert np.load(out / "level1_centroids.npy").shape == (40, 16)
    assert np.load(out / "level1_assignment.npy").max() < 40
    with pytest.raises(SystemExit):  # argparse: the choices are the library's
        main(["cluster", "--embeddings", str(store), "--levels", "4", "--fit", "elkan", "--output", str(out)])
    assert "invalid choice: 'elkan'" in capsys.readouterr().err
    fit_option = next(a for a in build_parser()._subparsers._group_actions[0].choices["cluster"]._actions
                      if a.dest == "fit")
    assert tuple(fit_option.choices) == FITS  # the command offers exactly the library's fits


@pytest.mark.parametrize("extra, expected", [([], (20, 256, "lloyd")), (["--fit", "swaps"], (6, 10, "swaps")),
                                             (["--fit", "swaps", "--iterations", "3"], (3, 10, "swaps")),
                                             (["--sample-per-centroid", "64"], (20, 64, "lloyd"))])
def test_each_fit_brings_its_own_defaults_unless_given(extra, expected, tmp_path, monkeypatch, capsys):
    import data_curation.kmeans

    seen = []

    def record(rows, levels, iterations, resampling_steps, per_cluster, seed, gpu, sample_per_centroid, fit):
        seen.append((iterations, sample_per_centroid, fit))
        raise InputError("recorded")

    monkeypatch.setattr(data_curation.kmeans, "hierarchical_kmeans", record)
    store = make_store(tmp_path / "emb", blobs(100, 8, 5))
    assert main(["cluster", "--embeddings", str(store), "--levels", "4", "--output", str(tmp_path / "cl"),
                 *extra]) == 2
    assert seen == [expected] and "recorded" in capsys.readouterr().err
