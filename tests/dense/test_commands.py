"""`distill features` and `distill pca` end to end on a tiny random ViT, and bad requests stopped in one line."""

import json

import numpy as np
import pytest
from PIL import Image

from distill.cli import main
from distill.data.filelists import read_paths

from tests.dense.conftest import TINY_VIT as TINY


@pytest.fixture
def images_and_weights(tmp_path, tiny_weights):
    weights = tiny_weights
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        canvas = np.zeros((40, 50), np.uint8)
        canvas[10:30, 5 + 10 * i:25 + 10 * i] = 200
        Image.fromarray(canvas).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"no image")
    return folder, weights


def test_features_per_image_and_in_shards(images_and_weights, tmp_path, capsys):
    folder, weights = images_and_weights
    out = tmp_path / "features"
    assert main(["features", str(folder), "--checkpoint", str(weights), *TINY, "--size", "42", "--stride", "7",
                 "--layer", "0", "-1", "--output", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["grid"] == [6, 6] and len(index["files"]) == 3 and index["images"][0].endswith("0.png")
    array = np.load(out / index["files"][0])
    assert array.dtype == np.float16 and array.shape == (6, 6, 64)  # two layers of 32
    assert read_paths(out / "unreadable.txt") == [str(folder / "broken.png")]
    assert "left out 1 unreadable image(s)" in capsys.readouterr().out
    shards = tmp_path / "shards"
    assert main(["features", str(folder), "--checkpoint", str(weights), *TINY, "--size", "28", "--stride", "7",
                 "--shards", "--batch-size", "2", "--output", str(shards)]) == 0
    index = json.loads((shards / "index.json").read_text())
    assert [f["rows"] for f in index["files"]] == [2, 1]
    assert np.load(shards / "features_00000.npy").shape == (2, 4, 4, 32)
    assert read_paths(shards / "features_00001.paths.txt") == [str(folder / "2.png")]


def test_pca_picture_and_masks(images_and_weights, tmp_path, capsys):
    folder, weights = images_and_weights
    figure, masks = tmp_path / "pca.png", tmp_path / "masks"
    assert main(["pca", str(folder / "0.png"), str(folder / "1.png"), str(folder / "2.png"), "--checkpoint",
                 str(weights), *TINY, "--size", "56", "--output", str(figure), "--masks", str(masks)]) == 0
    assert figure.stat().st_size > 5000
    mask = np.asarray(Image.open(masks / "0_mask.png"))
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}
    assert "PCA of 3 image(s), 8x8 patches each" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--layer", "5"], "layer [5] out of range"),
    (["--stride", "3"], "stride 3 must divide the patch size 7"),
    (["--facet", "key", "--stride", "14"], "stride 14 must divide the patch size 7"),
])
def test_bad_requests_are_one_line_and_write_nothing(images_and_weights, tmp_path, capsys, extra, message):
    folder, weights = images_and_weights
    out = tmp_path / "out"
    assert main(["features", str(folder), "--checkpoint", str(weights), *TINY, *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()
