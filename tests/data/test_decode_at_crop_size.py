"""JPEG photos decoded at the size their crops need: the boxes drawn as before, on the full image, and each crop cut
from the same region as a full decode gives; other files, small images and damaged files as before."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.configs import DatasetConfig, MultiCropConfig
from distill.data.datasets import FileImages, build_image_source
from distill.data.images import Frame, load_image, load_image_at_crop_size
from distill.data.loader import _FileSamples
from distill.data.views import MultiCrop
from distill.errors import InputError
from distill.seeds import derived_generator

# EXIF orientation -> the transposition that undoes it (what a camera stores for an upright scene)
_STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


def _save_jpeg(path, upright: Image.Image, orientation: int = 1):
    """`upright` saved at quality 95; with an orientation, stored turned so that the EXIF tag brings it upright."""
    if orientation == 1:
        upright.save(path, quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        upright.transpose(_STORED[orientation]).save(path, quality=95, exif=exif)
    return path


def _photo(width: int, height: int) -> Image.Image:
    """A real photo (scikit-image's astronaut) at the given size; shapes on gradients where it is not installed."""
    try:
        import skimage.data

        return Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    except ImportError:
        return _smooth(width, height)


def _smooth(width: int, height: int) -> Image.Image:
    """Smooth content with structure: colour gradients and soft discs."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)]
    for cx, cy, radius in ((0.3, 0.3, 0.12), (0.6, 0.45, 0.08), (0.45, 0.6, 0.15)):
        disc = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / radius**2) ** 2)
        channels = [c * (1 - disc) + disc * v for c, v in zip(channels, (1.0, 0.2, 0.6))]
    return Image.fromarray((np.stack(channels, -1) * 255).round().astype(np.uint8))


def _views(global_size=96, local_size=32, **overrides):
    return MultiCrop(MultiCropConfig(global_crops_size=global_size, local_crops_size=local_size, **overrides), 3)


def _decode(path, views, params=None, most=8.0, seed=0, mode="RGB"):
    """(crops, frame, params, decoded size): boxes drawn on the header's size (or `params`), the JPEG reduced as far
    as the views allow but no more than `most` times."""
    drawn = []

    def reduction(width, height):
        drawn.append(params or views.draw(height, width, derived_generator(seed)))
        return min(most, views.reduction(drawn[-1]))

    image, frame = load_image_at_crop_size(path, mode, views.min_image_size, reduction)
    return views.file_sample(image, frame, drawn[-1])["crops"], frame, drawn[-1], image.size


def _one_box(top, left, height, width):
    return [{"boxes": torch.tensor([[top, left, height, width]]), "flip": torch.tensor([False])}]


def test_reduced_decode_cuts_the_same_regions_as_a_full_decode(tmp_path):
    photo = _save_jpeg(tmp_path / "photo.jpg", _photo(640, 480))
    smooth = _save_jpeg(tmp_path / "smooth.jpg", _smooth(640, 480))
    views = _views()
    for seed in range(3):
        for path in (photo, smooth):
            full, full_frame, full_params, full_size = _decode(path, views, most=1, seed=seed)
            half, frame, params, size = _decode(path, views, most=2, seed=seed)
            assert full_frame.scale == 1 and full_size == (640, 480)
            assert frame.scale == 0.5 and size == (320, 240) and (frame.width, frame.height) == (640, 480)
            for a, b in zip(full_params, params):  # the same draws
                assert all(torch.equal(a[key], b[key]) for key in a)
            for a, b in zip(full, half):
                assert a.shape == b.shape
                a, b = a.float().flatten(), b.float().flatten()
                assert np.corrcoef(a, b)[0, 1] > 0.99
                if path == smooth:
                    assert (a - b).abs().mean() < 3.0  # out of 255


def _centroid(pixels) -> np.ndarray:
    """(row, column) of the brightness centroid of a grey array, in pixel coordinates (pixel i spans [i, i + 1))."""
    weights = np.asarray(pixels, np.float64)
    rows, cols = np.indices(weights.shape) + 0.5
    return np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_bright_square_lands_at_the_same_place(tmp_path, orientation):
    """An image that is no whole number of reduced pixels (645 x 482: 3/4 and 1/2 of a pixel left over at 1/4),
    turned by each EXIF orientation. The Frame maps the square's centre to where the reduced decode shows it, and
    the crop shows it where the box puts it, within the half output pixel that cutting on the reduced pixel grid
    allows (an origin that missed the partial pixel an orientation brings to the left or top: 3/4 of a reduced
    pixel off)."""
    upright = np.zeros((482, 645), np.uint8)
    upright[180:220, 300:340] = 255  # centre (row 200, column 320)
    path = _save_jpeg(tmp_path / f"square{orientation}.jpg", Image.fromarray(upright), orientation)
    views = _views(global_size=32, global_crops_number=1, local_crops_number=0)
    params = _one_box(150, 250, 160, 160)
    expected = np.array([(200 - 150) / 160 * 32, (320 - 250) / 160 * 32])

    reduced_image, frame = load_image_at_crop_size(path, "L", 32, lambda width, height: 4.0)
    assert frame.scale == 0.25 and reduced_image.size == (162, 121) and (frame.width, frame.height) == (645, 482)
    mapped = np.array([frame.top + 200 * frame.scale, frame.left + 320 * frame.scale])
    assert np.allclose(_centroid(reduced_image), mapped, atol=0.1)  # in reduced pixels

    reference = views.file_sample(Image.fromarray(upright).convert("RGB"), Frame(645, 482), params)  # no JPEG
    (full,), full_frame, _, _ = _decode(path, views, params, most=1)
    (reduced,), frame, _, _ = _decode(path, views, params, most=4)
    assert full_frame.scale == 1 and frame.scale == 0.25
    for crop, tolerance in ((reference["crops"][0], 0.05), (full, 0.05), (reduced, 0.5)):
        assert np.allclose(_centroid(crop[0]), expected, atol=tolerance)


def test_orientation_6_photo_matches_full_decode_and_exif_transpose(tmp_path):
    path = _save_jpeg(tmp_path / "turned.jpg", _photo(480, 640), orientation=6)
    views = _views()
    crops, frame, params, size = _decode(path, views, most=2)
    assert (frame.width, frame.height) == (480, 640) and size == (240, 320)
    old = views.file_sample(load_image(path), Frame(480, 640), params)["crops"]  # full decode, exif_transpose
    for a, b in zip(old, crops):
        assert np.corrcoef(a.float().flatten(), b.float().flatten())[0, 1] > 0.99


def test_reduction_only_where_every_box_allows_it(tmp_path):
    path = _save_jpeg(tmp_path / "big.jpg", _smooth(1280, 960))
    views = _views(global_size=224, local_size=96, global_crops_number=1, local_crops_number=1)
    wide = [_one_box(0, 0, 900, 1200)[0], _one_box(100, 100, 400, 400)[0]]  # 900 / 224, 400 / 96: 1/4 at most
    _, frame, _, size = _decode(path, views, wide)
    assert views.reduction(wide) == pytest.approx(900 / 224) and frame.scale == 0.25 and size == (320, 240)
    tight = [wide[0], _one_box(100, 100, 100, 100)[0]]  # a 96 px crop from a 100 px box: no room to shrink
    _, frame, _, size = _decode(path, views, tight)
    assert frame.scale == 1 and size == (1280, 960)


def _samples(paths, decode_at_crop_size, views, channels=3, substitute=True):
    """The loader's samples of epoch 0, and the Frame of each file decoded at crop size."""
    source = FileImages([str(p) for p in paths], None, [], "files", decode_at_crop_size)
    dataset = _FileSamples(source, views, seed=5, channels=channels, substitute=substitute)
    frames, load = [], source.load_at_crop_size

    def recorded(*args):
        image, frame = load(*args)
        frames.append(frame)
        return image, frame

    source.load_at_crop_size = recorded
    return [dataset[(0, index)] for index in range(len(paths))], frames


def test_loader_draws_the_same_boxes_and_reduces_large_jpegs(tmp_path):
    paths = [_save_jpeg(tmp_path / "a.jpg", _photo(640, 480)), _save_jpeg(tmp_path / "b.jpg", _smooth(400, 300), 6)]
    views = _views(global_size=48, local_size=24)
    new, frames = _samples(paths, True, views)
    old, none = _samples(paths, False, views)
    assert not none and all(frame.reduced for frame in frames)
    for a, b in zip(old, new):
        for pa, pb in zip(a["params"], b["params"]):
            assert all(torch.equal(pa[key], pb[key]) for key in pa)
        for ca, cb in zip(a["crops"], b["crops"]):
            assert ca.shape == cb.shape and np.corrcoef(ca.float().flatten(), cb.float().flatten())[0, 1] > 0.98
    grey, _ = _samples(paths[:1], True, views, channels=1)
    assert grey[0]["crops"][0].shape == (1, 48, 48)


def test_other_files_small_images_and_tight_boxes_decode_exactly_as_before(tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(png)
    small = _save_jpeg(tmp_path / "small.jpg", _photo(80, 60))  # upscaled to the global crop size first
    tight = _save_jpeg(tmp_path / "tight.jpg", _photo(300, 250))  # DINO's crops leave no room to shrink it
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (120, 150, 4), dtype=np.uint8)).save(rgba)
    paths = [png, small, tight, rgba]
    views = _views(global_size=224, local_size=96)
    new, frames = _samples(paths, True, views)
    old, _ = _samples(paths, False, views)
    assert len(frames) == 4 and not any(frame.reduced for frame in frames)
    for a, b in zip(old, new):
        assert all(torch.equal(ca, cb) for ca, cb in zip(a["crops"], b["crops"]))
    image, frame = load_image_at_crop_size(png, "RGB", 0, lambda width, height: 8.0)
    assert np.array_equal(np.asarray(image), np.asarray(load_image(png))) and not frame.reduced


def test_a_truncated_jpeg_fails_as_before(tmp_path):
    path = _save_jpeg(tmp_path / "whole.jpg", _photo(640, 480))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(OSError) as before:
        load_image(path)
    for factor in (1.0, 2.0, 8.0):
        with pytest.raises(type(before.value), match=re.escape(str(before.value))):
            load_image_at_crop_size(path, "RGB", 0, lambda width, height: factor)
    (sample,), _ = _samples([path], True, _views(), substitute=False)  # skipped and named, as before
    assert sample["unreadable"]


def test_the_switch(tmp_path):
    with pytest.raises(InputError, match="decode_at_crop_size"):
        DatasetConfig(kind="folder", path=str(tmp_path), decode_at_crop_size="yes").validate()
    _save_jpeg(tmp_path / "a.jpg", _smooth(64, 48))
    assert build_image_source(DatasetConfig(kind="folder", path=str(tmp_path))).decode_at_crop_size
    off = build_image_source(DatasetConfig(kind="folder", path=str(tmp_path), decode_at_crop_size=False))
    assert not off.decode_at_crop_size
