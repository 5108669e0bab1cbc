"""The linear segmentation probe: it learns a linearly separable toy case, its metrics match a hand computation,
its head and picture are written, bad masks are one-line errors naming the file, and `distill eval segment` runs
end to end on tiny Fashion-MNIST mosaics with a tiny random ViT."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.mosaics import MOSAIC_CLASSES, make_mosaics
from distill.dense import extract
from distill.cli.segment import add_segment_arguments, cmd_eval_segment, pair_files
from distill.dense.segmentation import (IGNORE_INDEX, LinearSegmentationHead, PALETTE, check_mask, confusion_matrix,
                                        evaluate_segmentation, load_head, load_masks, pixel_patches, predict,
                                        read_mask, save_head, save_segmentation_picture, segmentation_features,
                                        segmentation_metrics, train_head)
from distill.errors import InputError
from distill.models import create_backbone

TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=7, img_size=28, in_chans=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: more threads only add synchronisation, which costs seconds on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(count, generator, grid=8, cell=4, classes=4, dims=8):
    """Features [count, grid, grid, dims] whose first `classes` dims are a noisy one-hot of each cell's class, and
    masks [count, grid * cell, grid * cell] repeating each cell's class over its cell x cell pixels. Classes come
    in 2 x 2 regions of cells, as objects do: a checkerboard of single cells would lose its cells' corners to the
    bilinear upsampling of the logits, whatever the head."""
    regions = torch.randint(0, classes, (count, 2, 2), generator=generator)
    labels = regions.repeat_interleave(grid // 2, dim=1).repeat_interleave(grid // 2, dim=2)
    features = 0.3 * torch.randn(count, grid, grid, dims, generator=generator)
    features[..., :classes] += 2.0 * torch.nn.functional.one_hot(labels, classes).float()
    masks = labels.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).to(torch.uint8)
    return features, masks


def test_the_probe_learns_a_linearly_separable_case():
    generator = torch.Generator().manual_seed(0)
    features, masks = _toy(24, generator)
    masks[:, :2, :2] = IGNORE_INDEX  # ignored pixels are not trained on (they would be class 255)
    head = train_head(features, masks, 4, epochs=15, lr=5e-2, batch_size=8)
    val_features, val_masks = _toy(8, generator)
    metrics = evaluate_segmentation(head, val_features, val_masks, ["a", "b", "c", "d"])
    assert metrics["miou"] > 95 and metrics["pixel_accuracy"] > 97
    assert all(value > 90 for value in metrics["per_class_iou"].values())


def test_metrics_match_a_hand_computation():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255],
                           [1, 1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1, 1],
                               [0, 2, 0, 3],
                               [1, 2, 2, 0]])
    names = ["zero", "one", "two", "three", "four"]
    confusion = confusion_matrix(prediction, target, 5)
    assert confusion.sum() == 10  # the two ignored pixels are out
    metrics = segmentation_metrics(confusion, names)
    # zero: 2 hits, 1 false positive (a 2), 1 miss (predicted 1): 2 / 4; one: 3 hits, 1 false positive (a 0),
    # 1 miss (predicted 2): 3 / 5; two: 2 hits, 1 false positive (a 1), 1 miss (predicted 0): 2 / 4; three:
    # predicted only on an ignored pixel, so absent like four, and both are left out of the mean
    per_class = metrics["per_class_iou"]
    assert per_class["zero"] == pytest.approx(50.0) and per_class["one"] == pytest.approx(60.0)
    assert per_class["two"] == pytest.approx(50.0) and per_class["three"] is None and per_class["four"] is None
    assert metrics["miou"] == pytest.approx((50 + 60 + 50) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(70.0)
    # the same through a head set by hand: identity weights on one-hot features at mask resolution
    head = LinearSegmentationHead(5, 5, batch_norm=False)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(5)[:, :, None, None])
        head.linear.bias.zero_()
    features = torch.nn.functional.one_hot(prediction, 5).float()[None]
    assert evaluate_segmentation(head, features, [target.to(torch.uint8)], names) == metrics


def test_heads_round_trip_and_bad_head_files(tmp_path):
    generator = torch.Generator().manual_seed(1)
    features, masks = _toy(6, generator)
    head = train_head(features, masks, 4, epochs=2, lr=1e-2, batch_size=3)
    path = save_head(tmp_path / "head.pth", head, ["a", "b", "c", "d"], "last4")
    assert not list(tmp_path.glob(".*.tmp"))
    loaded, names, layers = load_head(path)
    assert names == ["a", "b", "c", "d"] and layers == "last4" and loaded.batch_norm
    sizes = [(32, 32)] * 6
    assert all(torch.equal(a, b) for a, b in zip(predict(head, features, sizes), predict(loaded, features, sizes)))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    for bad in (tmp_path / "other.pth", tmp_path / "missing.pth"):
        with pytest.raises(InputError, match=bad.name):
            load_head(bad)


def test_the_picture_is_written(tmp_path):
    images = torch.randn(3, 1, 16, 16)
    masks = [torch.randint(0, 4, (16, 16), dtype=torch.uint8) for _ in range(3)]
    masks[0][0, 0] = IGNORE_INDEX
    predictions = [torch.randint(0, 4, (16, 16), dtype=torch.uint8) for _ in range(3)]
    path = save_segmentation_picture(tmp_path / "segmentation.png", images, masks, predictions, [0.5], [0.25],
                                     ["bg", "a", "b", "c"], ["x.png", "y.png", "z.png"])
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 200 and picture.height > 200
    assert tuple(PALETTE[0]) == (0, 0, 0) and tuple(PALETTE[1]) == (128, 0, 0)
    assert tuple(PALETTE[IGNORE_INDEX]) == (224, 224, 192)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


def test_bad_masks_are_errors_naming_the_file(tmp_path):
    good = _write_png(tmp_path / "good.png", np.full((8, 10), 2))
    assert read_mask(good).shape == (8, 10)
    assert load_masks([good], 3, [(8, 10)], ["good.jpg"])[0].dtype == torch.uint8
    with pytest.raises(InputError, match="good.png is 10x8 but its image cat.jpg is 12x8") as error:
        load_masks([good], 3, [(8, 12)], ["cat.jpg"])
    assert "\n" not in str(error.value)
    too_large = _write_png(tmp_path / "too_large.png", np.full((8, 10), 7))
    with pytest.raises(InputError, match="too_large.png holds class index 7 but there are 3 classes"):
        load_masks([too_large], 3)
    ignored = _write_png(tmp_path / "ignored.png", np.full((8, 10), IGNORE_INDEX))
    assert (check_mask(read_mask(ignored), 3, ignored) == IGNORE_INDEX).all()
    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(colour)
    with pytest.raises(InputError, match="colour.png is a RGB image"):
        read_mask(colour)
    with pytest.raises(InputError, match="absent.png not found"):
        read_mask(tmp_path / "absent.png")


def test_pixel_patches_and_features_of_the_last_layers():
    images = torch.randn(2, 1, 28, 21)
    pixels = pixel_patches(images, 7, chunk=1)
    assert pixels.patches.shape == (2, 4, 3, 49) and pixels.grid == (4, 3)
    assert torch.equal(pixels.patches[1, 2, 1], images[1, 0, 14:21, 7:14].reshape(-1))
    model = create_backbone("vit_tiny", **{**TINY, "depth": 4}).eval()
    last4 = segmentation_features(model, images[:, :, :, :21], "last4")
    assert last4.patches.shape == (2, 4, 3, 4 * 32)
    by_hand = extract(model, images[:, :, :, :21], layers=(-4, -3, -2, -1)).patches
    assert torch.equal(last4.patches, by_hand)
    assert segmentation_features(model, images, "last").patches.shape[-1] == 32
    with pytest.raises(InputError):
        segmentation_features(model, images, "first")


def _mosaic_dataset(root, count, seed, split):
    """Tiny mosaics as PNG folders root/images, root/masks, with classes.txt beside them."""
    mosaics = make_mosaics(count, size=56, split=split, seed=seed)
    for index in range(count):
        _write_png(root / "images" / f"{index:03d}.png", mosaics.images[index].numpy())
        _write_png(root / "masks" / f"{index:03d}.png", mosaics.masks[index].numpy())
    (root / "classes.txt").write_text("\n".join(MOSAIC_CLASSES) + "\n")
    return root / "images", root / "masks"


def _command_args(tmp_path, train, val, *extra):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    if not checkpoint.exists():
        torch.save(create_backbone("vit_tiny", **TINY).state_dict(), checkpoint)
    parser = argparse.ArgumentParser()
    add_segment_arguments(parser)
    sets = [f"{key}={value}" for key, value in TINY.items()]
    return parser.parse_args(["--checkpoint", str(checkpoint), "--backbone", "vit_tiny", "--set", *sets,
                              "--train", *map(str, train), "--val", *map(str, val), *extra])


def test_the_command_runs_end_to_end(tmp_path, capsys):
    train = _mosaic_dataset(tmp_path / "train", 8, 0, "train")
    val = _mosaic_dataset(tmp_path / "val", 3, 1, "test")
    output = tmp_path / "out"
    args = _command_args(tmp_path, train, val, "--size", "56", "--epochs", "2", "--layers", "last",
                         "--pixel-baseline", "--precision", "fp32", "--output", str(output))
    results = cmd_eval_segment(args)
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "pixel accuracy" in printed and "Ankle boot" in printed
    written = json.loads((output / "segmentation.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["classes"] == list(MOSAIC_CLASSES) and written["feature_dim"] == 32
    assert written["image_size"] == 56 and written["train_images"] == 8 and written["val_images"] == 3
    for key in ("probe", "pixel_baseline"):
        assert 0 <= written[key]["miou"] <= 100 and set(written[key]["per_class_iou"]) == set(MOSAIC_CLASSES)
    head, names, layers = load_head(output / "segmentation_head.pth")
    assert names == list(MOSAIC_CLASSES) and layers == "last" and head.in_features == 32
    with Image.open(output / "segmentation.png") as picture:
        assert picture.format == "PNG"


def test_command_errors_name_the_file_and_write_nothing(tmp_path):
    train = _mosaic_dataset(tmp_path / "train", 4, 0, "train")
    val = _mosaic_dataset(tmp_path / "val", 2, 1, "test")
    output = tmp_path / "out"
    _write_png(val[1] / "001.png", np.zeros((50, 56)))  # a mask of the wrong size
    with pytest.raises(InputError, match="001.png is 56x50 but its image .*001.png is 56x56"):
        cmd_eval_segment(_command_args(tmp_path, train, val, "--epochs", "1", "--output", str(output)))
    _write_png(val[1] / "001.png", np.full((56, 56), 11))  # one class beyond classes.txt's eleven
    with pytest.raises(InputError, match="001.png holds class index 11 but there are 11 classes"):
        cmd_eval_segment(_command_args(tmp_path, train, val, "--epochs", "1", "--output", str(output)))
    with pytest.raises(InputError, match="--layers last4 takes the last 4 blocks but the model has 2"):
        cmd_eval_segment(_command_args(tmp_path, train, val, "--layers", "last4", "--output", str(output)))
    (val[1] / "001.png").unlink()
    with pytest.raises(InputError, match="no mask for .*001.png"):
        cmd_eval_segment(_command_args(tmp_path, train, val, "--epochs", "1", "--output", str(output)))
    assert not output.exists()


def test_file_lists_pair_in_order_with_paths_relative_to_the_list(tmp_path):
    images = [_write_png(tmp_path / "data" / name, np.zeros((4, 4))) for name in ("b.png", "a.png")]
    masks = [_write_png(tmp_path / "data" / name, np.zeros((4, 4))) for name in ("mb.png", "ma.png")]
    (tmp_path / "data" / "images.txt").write_text("b.png\na.png\n")
    (tmp_path / "data" / "masks.txt").write_text("mb.png\nma.png\n")
    assert pair_files(str(tmp_path / "data" / "images.txt"), str(tmp_path / "data" / "masks.txt")) == (images, masks)
    (tmp_path / "data" / "masks.txt").write_text("mb.png\n")
    with pytest.raises(InputError, match="2 images .* but 1 masks"):
        pair_files(str(tmp_path / "data" / "images.txt"), str(tmp_path / "data" / "masks.txt"))
    with pytest.raises(InputError, match="nowhere not found"):
        pair_files(str(tmp_path / "nowhere"), str(tmp_path / "data" / "masks.txt"))
