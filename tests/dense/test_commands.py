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
    assert "PCA of 3 image(s) (all shown), 8x8 patches each" in capsys.readouterr().out


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


def test_features_into_a_used_folder_need_force_and_then_leave_nothing_stale(images_and_weights, tmp_path, capsys,
                                                                            monkeypatch):
    folder, weights = images_and_weights
    monkeypatch.chdir(tmp_path)  # relative paths, as typed
    run = ["--checkpoint", str(weights), *TINY, "--size", "28"]
    assert main(["features", "images", *run, "--output", "out"]) == 0
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert before == ["000000_0.npy", "000001_1.npy", "000002_2.npy", "index.json", "unreadable.txt"]
    capsys.readouterr()
    assert main(["features", "images/1.png", *run, "--output", "out"]) == 2
    assert "holds features written before: pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert main(["features", "images/1.png", *run, "--output", "out", "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000_1.npy", "index.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["features", "images", *run, "--output", "other", "--force"]) == 2
    assert "holds other files" in capsys.readouterr().err and (tmp_path / "other" / "notes.txt").exists()


def test_the_lists_features_write_can_be_given_back_and_a_chunk_of_unreadable_images_says_why(
        images_and_weights, tmp_path, capsys, monkeypatch):
    folder, weights = images_and_weights
    monkeypatch.chdir(tmp_path)
    run = ["--checkpoint", str(weights), *TINY, "--size", "28"]
    assert main(["features", "images", *run, "--shards", "--batch-size", "1", "--output", "shards"]) == 0
    assert "broken.png (not an image file Pillow can read" in capsys.readouterr().out  # its reason, alone in its chunk
    assert read_paths(tmp_path / "shards" / "unreadable.txt") == [str(folder / "broken.png")]
    assert main(["features", "shards/features_00001.paths.txt", *run, "--output", "again"]) == 0
    assert json.loads((tmp_path / "again" / "index.json").read_text())["images"] == [str(folder / "1.png")]


def test_pca_refuses_other_pictures_and_keeps_every_mask_of_images_with_one_name(images_and_weights, tmp_path,
                                                                                capsys):
    folder, weights = images_and_weights
    run = ["--checkpoint", str(weights), *TINY, "--size", "28"]
    assert main(["pca", str(folder), *run, "--output", str(tmp_path / "pca.json")]) == 2
    assert "must be a .png file" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    assert main(["pca", str(folder), *run, "--output", str(tmp_path / "p.png"), "--masks",
                 str(tmp_path / "taken")]) == 2
    assert "is a file: give a folder" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.open(folder / "2.png").save(twin / "0.png")  # another image of the same name
    masks = tmp_path / "masks"
    assert main(["pca", str(folder), str(twin), *run, "--show", "2", "--output", str(tmp_path / "p.png"),
                 "--masks", str(masks)]) == 0
    out = capsys.readouterr().out
    assert "PCA of 4 image(s) (the first 2 of them shown)" in out
    listed = [line.split("\t") for line in (masks / "masks.txt").read_text().splitlines()]
    assert [name for name, _ in listed] == ["0_mask.png", "1_mask.png", "2_mask.png", "0_2_mask.png"]
    assert listed[3][1] == str(twin / "0.png") and sorted(p.name for p in masks.iterdir()) == sorted(
        [name for name, _ in listed] + ["masks.txt"])
