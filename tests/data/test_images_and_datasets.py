"""Decoding odd image files, and the dataset kinds: ImageFolder, flat folder, file list."""

import logging

import numpy as np
import pytest
from PIL import Image

from distill.data.configs import DatasetConfig

from distill.data.datasets import build_image_source
from distill.data.images import load_image
from distill.errors import InputError


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_every_mode_becomes_rgb_or_grey(tmp_path):
    transparent = _save(tmp_path / "rgba.png", Image.new("RGBA", (6, 5), (255, 0, 0, 0)))
    half = _save(tmp_path / "la.png", Image.new("LA", (6, 5), (0, 128)))
    cmyk = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (6, 5), (0, 255, 0, 0)))
    palette = Image.new("P", (6, 5))
    palette.putpalette([0, 0, 255] * 256)
    palette = _save(tmp_path / "p.png", palette)
    deep = _save(tmp_path / "deep.png", Image.fromarray(np.full((5, 6), 65535, np.uint16)))
    bilevel = _save(tmp_path / "one.png", Image.new("1", (6, 5), 1))
    assert np.asarray(load_image(transparent))[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert np.asarray(load_image(half))[0, 0].tolist() == [127, 127, 127]  # black at alpha 128/255 over white
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 255]
    assert np.asarray(load_image(palette))[0, 0].tolist() == [0, 0, 255]
    assert np.asarray(load_image(deep))[0, 0].tolist() == [255, 255, 255]  # 16-bit full scale -> 8-bit full
    assert np.asarray(load_image(bilevel, mode="L"))[0, 0] == 255
    for path in (transparent, cmyk, palette, deep, bilevel):
        assert load_image(path).mode == "RGB" and load_image(path, mode="L").mode == "L"


def test_small_images_are_upscaled_to_the_crop_size(tmp_path):
    path = _save(tmp_path / "tiny.png", Image.new("RGB", (10, 20)))
    assert load_image(path, min_size=64).size == (64, 128)
    assert load_image(path, min_size=8).size == (10, 20)


def _tree(tmp_path):
    for cls, count in (("cat", 3), ("dog", 2)):
        for i in range(count):
            _save(tmp_path / "train" / cls / f"{i}.png", Image.new("RGB", (8, 8), (i * 40, 0, 0)))
    return tmp_path


def test_imagefolder_flat_folder_and_file_list(tmp_path):
    root = _tree(tmp_path / "tree")
    source = build_image_source(DatasetConfig(kind="auto", path=str(root)), "train")
    assert source.classes == ["cat", "dog"] and source.labels.tolist() == [0, 0, 0, 1, 1]
    flat = build_image_source(DatasetConfig(kind="folder", path=str(root)), "train")
    assert len(flat) == 5 and flat.labels is None
    listing = tmp_path / "list.txt"
    listing.write_text("# images\ntree/train/cat/0.png cat\ntree/train/dog/1.png dog\n\ntree/train/cat/2.png, cat\n")
    from_list = build_image_source(DatasetConfig(kind="auto", path=str(listing)))
    assert from_list.classes == ["cat", "dog"] and from_list.labels.tolist() == [0, 1, 0]
    assert from_list.paths[0] == str(tmp_path / "tree/train/cat/0.png")
    unlabelled = tmp_path / "plain.txt"
    unlabelled.write_text(f"{root}/train/cat/0.png\n")
    assert build_image_source(DatasetConfig(kind="filelist", path=str(unlabelled))).labels is None


def test_unreadable_files_are_skipped_counted_and_named(tmp_path, caplog):
    root = _tree(tmp_path)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    truncated = root / "train" / "dog" / "cut.png"
    _save(truncated, Image.new("RGB", (64, 64), (1, 2, 3)))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with caplog.at_level(logging.WARNING):
        source = build_image_source(DatasetConfig(kind="imagefolder", path=str(root)), "train")
    assert len(source) == 5 and len(source.unreadable) == 2
    assert "skipping 2 unreadable image(s) of 7" in caplog.text and "broken.png" in caplog.text
    assert "cut.png" in caplog.text


def test_empty_or_unreadable_sources_fail_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        build_image_source(DatasetConfig(kind="folder", path=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(InputError, match="none of the 1 image files"):
        build_image_source(DatasetConfig(kind="folder", path=str(tmp_path / "bad")))
    with pytest.raises(InputError, match="does not exist"):
        build_image_source(DatasetConfig(kind="folder", path=str(tmp_path / "nowhere")))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.png 1\nb.png\n")
    with pytest.raises(InputError, match="label every line or none"):
        build_image_source(DatasetConfig(kind="filelist", path=str(mixed)))
    with pytest.raises(InputError, match="needs data.dataset.path"):
        DatasetConfig(kind="folder").validate()


def test_a_link_loop_ends_and_a_file_reached_twice_counts_once(tmp_path, caplog):
    folder = tmp_path / "photos"
    for i in range(52):
        _save(folder / ("a" if i % 2 else "b") / f"{i}.png", Image.new("L", (8, 8), i))
    (folder / "loop").symlink_to(".")  # a loop: photos/loop/loop/... would never end
    (folder / "again").symlink_to("a")  # the same folder by a second name
    (folder / "b" / "link_to_0.png").symlink_to(folder / "b" / "0.png")  # the same file by a second name
    (folder / "b" / "moved.png").symlink_to(tmp_path / "elsewhere.png")  # a link whose image is gone
    with caplog.at_level(logging.WARNING, logger="distill"):
        source = build_image_source(DatasetConfig(kind="folder", path=str(folder)))
    assert len(source) == 52 and len(set(source.paths)) == 52
    assert source.paths[0].endswith("/a/1.png")  # the first path of each file, in sorted order
    warned = [r.getMessage() for r in caplog.records if "lead nowhere" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 link(s) under ") and "b/moved.png" in warned[0]


def test_sixteen_bit_images_scale_by_their_type_not_their_content(tmp_path):
    dark = _save(tmp_path / "dark.png", Image.fromarray(np.full((4, 4), 255, np.uint16)))  # 255 of 65535
    bright = _save(tmp_path / "bright.png", Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    assert np.asarray(load_image(dark, mode="L")).max() == 1  # 255 / 65535 of full scale, not full white
    assert np.asarray(load_image(bright, mode="L")).min() == 255


def test_an_image_over_the_decompression_bomb_limit_says_why_and_the_option_lets_it_in(tmp_path, caplog):
    from PIL import Image as PILImage

    for i in range(3):
        _save(tmp_path / "pool" / f"{i}.png", Image.new("L", (8, 8), i))
    _save(tmp_path / "pool" / "huge.png", Image.new("L", (200, 200)))  # over twice the limit: Pillow refuses it
    _save(tmp_path / "pool" / "big.png", Image.new("L", (120, 120)))  # over it, under twice: Pillow only warns
    default = PILImage.MAX_IMAGE_PIXELS
    try:
        with caplog.at_level(logging.WARNING):
            source = build_image_source(DatasetConfig(kind="folder", path=str(tmp_path / "pool"),
                                                      max_image_pixels=10_000))
        assert len(source) == 3
        assert sorted(source.unreadable) == [str(tmp_path / "pool" / name) for name in ("big.png", "huge.png")]
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "exceeds limit of 20000 pixels" in said and "data.dataset.max_image_pixels" in said
        source = build_image_source(DatasetConfig(kind="folder", path=str(tmp_path / "pool"), max_image_pixels=-1))
        assert len(source) == 5 and not source.unreadable
    finally:
        PILImage.MAX_IMAGE_PIXELS = default


def test_normalisation_statistics_fit_the_channels_or_are_refused():
    from distill.data.augment import match_channels

    assert match_channels([0.5], [0.2, 0.3, 0.4], 3) == ([0.5] * 3, [0.2, 0.3, 0.4])  # each on its own count
    assert match_channels([0.3, 0.6, 0.9], [0.3], 1) == (pytest.approx([0.6]), [0.3])  # RGB averaged for grey
    for mean, std, channels, message in (([0.5, 0.5], [0.2], 3, r"mean \[0.5, 0.5\] has 2 values for 3-channel"),
                                         ([0.5], [0.2, 0.2], 1, r"give 1 \(or 3, averaged\)"),
                                         ([0.5], [0.0], 3, "must be positive"),
                                         ([float("nan")], [0.2], 3, "must be finite")):
        with pytest.raises(InputError, match=message):
            match_channels(mean, std, channels)
