"""Fashion-MNIST mosaics against the real items they are made of, and warps against where a bright dot goes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.fashion_mnist import load_fashion_mnist
from distill.data.mosaics import (FOREGROUND_THRESHOLD, IGNORE_INDEX, MOSAIC_CLASSES, make_mosaics, photometric,
                                  random_homography, warp_points, warped_pair)
from distill.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def test_same_seed_same_mosaics_and_a_longer_run_extends_a_shorter_one():
    first, again = make_mosaics(6, seed=3), make_mosaics(6, seed=3)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert all(torch.equal(a, b) for a, b in zip(first.boxes, again.boxes))
    assert not torch.equal(first.images, make_mosaics(6, seed=4).images)
    shorter = make_mosaics(3, seed=3)
    assert torch.equal(shorter.images, first.images[:3]) and torch.equal(shorter.masks, first.masks[:3])


def test_masks_and_boxes_follow_the_items_pixels():
    mosaics = make_mosaics(12, size=56, items=(2, 4), split="test", seed=1)
    items, labels = load_fashion_mnist("test")
    assert mosaics.images.shape == mosaics.masks.shape == (12, 56, 56)
    assert mosaics.images.dtype == mosaics.masks.dtype == torch.uint8
    assert len(MOSAIC_CLASSES) == 11 and MOSAIC_CLASSES[0] == "background"
    # a pixel carries a class exactly where an item is brighter than the threshold
    assert torch.equal(mosaics.masks > 0, mosaics.images > FOREGROUND_THRESHOLD)
    for i in range(len(mosaics)):
        sources, offsets = mosaics.sources[i].numpy(), mosaics.offsets[i].numpy()
        assert 2 <= len(sources) <= 4
        assert mosaics.labels[i].tolist() == labels[sources].tolist()
        layers = np.zeros((len(sources), 56, 56), np.int64)
        for k, (source, (x, y)) in enumerate(zip(sources, offsets)):
            layers[k, y:y + 28, x:x + 28] = items[source]
            x0, y0, x1, y1 = mosaics.boxes[i][k].tolist()
            foreground = np.argwhere(layers[k] > FOREGROUND_THRESHOLD)
            assert (y0, x0) == tuple(foreground.min(0)) and (y1 - 1, x1 - 1) == tuple(foreground.max(0))
        canvas = mosaics.images[i].numpy()
        assert np.array_equal(canvas, layers.max(0))  # the brighter pixel shows where items overlap
        mask = mosaics.masks[i].numpy()
        for y, x in np.argwhere(mask > 0):  # the class of an item whose pixel is the one shown
            showing = [k for k in range(len(sources)) if layers[k, y, x] == canvas[y, x]]
            assert mask[y, x] - 1 in labels[sources[showing]]


def test_items_overlap_little_where_there_is_room():
    mosaics = make_mosaics(10, size=64, items=(2, 2), seed=0, max_overlap=0.1)
    items, _ = load_fashion_mnist("train")
    for i in range(len(mosaics)):
        layers = np.zeros((2, 64, 64), bool)
        for k, (source, (x, y)) in enumerate(zip(mosaics.sources[i].tolist(), mosaics.offsets[i].tolist())):
            layers[k, y:y + 28, x:x + 28] = items[source] > FOREGROUND_THRESHOLD
        assert (layers[0] & layers[1]).sum() <= 0.1 * layers[1].sum(), i


def test_items_from_given_data_and_bad_arguments():
    data = (np.full((3, 28, 28), 200, np.uint8), np.array([0, 5, 9]))
    mosaics = make_mosaics(4, size=28, items=(1, 1), data=data)
    assert set(mosaics.masks.unique().tolist()) <= {1, 6, 10} and (mosaics.masks > 0).all()
    for bad in (dict(count=-1), dict(count=2, size=20), dict(count=2, items=(3, 2)), dict(count=2, items=(0, 1)),
                dict(count=2, seed=-1)):
        with pytest.raises(InputError):
            make_mosaics(**bad, data=data)


def _blob(height, width, x, y, sigma=1.5):
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))


def _centroid(image):
    weights = (image.float() - image.float().median()).clamp_min(0)
    weights = torch.where(weights > 0.5 * weights.max(), weights, torch.zeros(()))
    ys, xs = torch.nonzero(weights > 0, as_tuple=True)
    w = weights[ys, xs]
    return torch.stack([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_bright_dot_goes_where_warp_points_says(seed):
    dot = torch.tensor([[30.0, 26.0]])
    image = _blob(64, 64, *dot[0].tolist())
    generator = torch.Generator().manual_seed(seed)
    warped, _, homography = warped_pair(image, None, generator)
    assert warped.shape == image.shape and warped.dtype == image.dtype
    assert torch.allclose(_centroid(warped), warp_points(homography, dot)[0], atol=0.4)
    grey = (image * 255).round().to(torch.uint8)  # the same for uint8 images, rounding aside
    warped_grey, _, homography = warped_pair(grey, None, torch.Generator().manual_seed(seed))
    assert warped_grey.dtype == torch.uint8
    assert torch.allclose(_centroid(warped_grey), warp_points(homography, dot)[0], atol=0.5)


def test_warped_masks_move_with_the_image_and_mark_the_outside_ignored():
    image = torch.zeros(48, 48, dtype=torch.uint8)
    mask = torch.zeros(48, 48, dtype=torch.uint8)
    image[16:32, 16:32], mask[16:32, 16:32] = 200, 3
    for seed in range(4):
        warped, warped_mask, homography = warped_pair(image[None], mask, torch.Generator().manual_seed(seed))
        assert warped.shape == (1, 48, 48) and warped_mask.dtype == torch.uint8
        assert set(warped_mask.unique().tolist()) <= {0, 3, IGNORE_INDEX}
        x, y = warp_points(homography, torch.tensor([[23.5, 23.5]]))[0].round().long().tolist()
        assert warped_mask[y, x] == 3 and warped[0, y, x] > 0
        corners = warp_points(torch.linalg.inv(homography), torch.tensor([[0.0, 0.0], [47.0, 47.0]]))
        outside = ((corners < -0.5) | (corners > 47.5)).any(dim=1)
        for (cx, cy), out in zip([(0, 0), (47, 47)], outside.tolist()):
            assert (warped_mask[cy, cx] == IGNORE_INDEX) == out


def test_warp_points_inverts_and_the_homography_is_mild():
    generator = torch.Generator().manual_seed(0)
    homography = random_homography(56, 56, generator)
    points = torch.rand(20, 2) * 55
    back = warp_points(torch.linalg.inv(homography), warp_points(homography, points))
    assert torch.allclose(back, points, atol=1e-4)
    assert torch.allclose(warp_points(torch.eye(3, dtype=torch.float64), points), points)
    moved = (warp_points(homography, points) - points).norm(dim=1)
    assert moved.max() < 25  # an affine + mild perspective change, not a scramble


def test_photometric_keeps_shape_dtype_and_range():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    changed = photometric(image, torch.Generator().manual_seed(0))
    assert changed.shape == image.shape and changed.dtype == torch.uint8 and not torch.equal(changed, image)
    floats = photometric(torch.rand(8, 8), torch.Generator().manual_seed(0))
    assert floats.min() >= 0 and floats.max() <= 1


def test_the_tool_writes_images_masks_and_classes(tmp_path):
    spec = importlib.util.spec_from_file_location("fashion_mnist_mosaics", ROOT / "tools" / "fashion_mnist_mosaics.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--count", "3", "--size", "56", "--split", "test", "--seed", "2", "--output",
                      str(tmp_path)]) == 0
    expected = make_mosaics(3, size=56, split="test", seed=2)
    for index in range(3):
        image = np.array(Image.open(tmp_path / "images" / f"{index:05d}.png"))
        mask = Image.open(tmp_path / "masks" / f"{index:05d}.png")
        assert mask.mode == "L" and np.array_equal(np.array(mask), expected.masks[index].numpy())
        assert np.array_equal(image, expected.images[index].numpy())
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(MOSAIC_CLASSES)
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    assert boxes["mosaics"][1]["boxes"] == expected.boxes[1].tolist()
    assert tool.main(["--count", "1", "--size", "20", "--output", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
