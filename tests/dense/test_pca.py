"""PCA pictures: the first component separates a constructed foreground, oriented by the borders; the picture and
its masks are written."""

import torch

from distill.dense.features import DenseFeatures
from distill.dense.pca import mask_iou, pca_picture, save_pca_figure, upsample_mask


def _features(invert: bool = False):
    torch.manual_seed(0)
    B, h, w, C = 3, 8, 8, 16
    truth = torch.zeros(B, h, w, dtype=torch.bool)
    truth[0, 2:6, 2:5] = True
    truth[1, 3:7, 1:4] = True
    truth[2, 1:4, 4:7] = True
    direction = torch.randn(C)
    patches = torch.randn(B, h, w, C) * 0.1 + torch.where(truth[..., None], direction, -direction) * (
        -1 if invert else 1)
    return DenseFeatures(patches, None, 8, 8, (64, 64)), truth


def test_the_first_component_finds_the_foreground_whatever_its_sign():
    for invert in (False, True):
        features, truth = _features(invert)
        picture = pca_picture(features)
        assert torch.equal(picture.foreground, truth)
        assert picture.rgb.shape == (3, 8, 8, 3) and (picture.rgb[~truth] == 0).all()
        assert 0 <= float(picture.first.min()) and float(picture.first.max()) <= 1


def test_masks_upsample_and_iou(tmp_path):
    features, truth = _features()
    picture = pca_picture(features)
    pixels = upsample_mask(picture.foreground[0], (64, 64))
    assert pixels.shape == (64, 64) and mask_iou(pixels, upsample_mask(truth[0], (64, 64))) == 1.0
    half = truth[0].clone()
    half[2:4] = False  # 2 of the 4 foreground rows
    assert mask_iou(half, truth[0]) == 0.5
    shown = [torch.rand(64, 64, 3) for _ in range(3)]
    path = save_pca_figure(shown, picture, tmp_path / "pca.png", ["a", "b", "c"])
    assert path.stat().st_size > 5000
