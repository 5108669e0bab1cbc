"""`distill eval knn`, `distill eval linear` and `distill attention` on a trained run and on official layouts."""

import json

import pytest
import torch

from distill.cli import main
from distill.engine.checkpointing import LATEST
from distill.engine.trainer import Trainer
from distill.eval.attention import class_token_attention, threshold_masks
from distill.eval.linear import linear_features, linear_probe
from distill.models import create_backbone


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.tiny_dino import UNIT_RUN as TINY
    from distill.engine.train_config import load_train_config

    folder = tmp_path_factory.mktemp("run")
    Trainer(load_train_config(None, TINY + [f"train.output_dir={folder}", "train.max_steps=4"])).run()
    return folder


def test_knn_on_a_run_rebuilds_its_backbone(trained_run, tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["eval", "knn", "--checkpoint", str(trained_run / LATEST), "--data", "fashion_mnist",
                 "--train-limit", "600", "--val-limit", "200", "--k", "5", "20", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "training checkpoint -> teacher.backbone" in printed and "16 px views" in printed
    results = json.loads(out.read_text())["knn"]
    assert set(results) == {"5", "20"} and 10.0 < results["20"]["top1"] <= 100.0


def test_linear_probe_on_an_exported_backbone(trained_run, tmp_path, capsys):
    dims = ["--set", "depth=2", "embed_dim=32", "num_heads=2", "patch_size=4", "img_size=16", "in_chans=1"]
    code = main(["eval", "linear", "--checkpoint", str(trained_run / "teacher_backbone.pth"), "--backbone",
                 "dino_vits16", *dims, "--data", "fashion_mnist", "--train-limit", "600", "--val-limit", "200",
                 "--n-last-blocks", "2", "--avgpool", "--epochs", "5"])
    assert code == 0
    assert "(96-d features" in capsys.readouterr().out  # 2 class tokens + pooled patches, 32 each


def test_attention_figure_from_image_files(trained_run, tmp_path, capsys):
    from PIL import Image

    paths = []
    (tmp_path / "images").mkdir()
    for i in range(2):
        paths.append(tmp_path / "images" / f"{i}.png")
        Image.new("L", (40, 30), 50 * i).save(paths[-1])
    figure = tmp_path / "attention.png"
    assert main(["attention", "--checkpoint", str(trained_run / LATEST), "--images", *map(str, paths),
                 "--output", str(figure)]) == 0
    assert figure.stat().st_size > 5000 and "attention maps of 2 image(s)" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["attention", "--checkpoint", str(trained_run / LATEST), "--images", str(tmp_path / "no.png")]) == 2
    assert "no.png does not exist" in capsys.readouterr().err
    # a folder, as features and pca take it; --count shows the first ones and says so
    assert main(["attention", "--checkpoint", str(trained_run / LATEST), "--images", str(tmp_path / "images"),
                 "--count", "1", "--output", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "images: 1 of the 2 image(s) of --images" in out and "attention maps of 1 image(s)" in out
    assert main(["attention", "--checkpoint", str(trained_run / LATEST), "--output", str(figure)]) == 0
    assert "images: the first 8 image(s) of Fashion-MNIST test" in capsys.readouterr().out


def test_attention_refuses_a_picture_that_is_not_png_and_a_threshold_outside_0_1(trained_run, tmp_path, capsys):
    run = ["attention", "--checkpoint", str(trained_run / LATEST)]
    assert main([*run, "--output", str(tmp_path / "maps.json")]) == 2
    assert "must be a .png file" in capsys.readouterr().err and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as refused:
        main([*run, "--threshold", "5"])
    assert refused.value.code == 2 and "must be below 1, got 5" in capsys.readouterr().err


def test_attention_on_photos_with_a_bare_state_dict_takes_the_model_s_statistics(tmp_path, capsys):
    from PIL import Image

    weights = create_backbone("dino_vits16", depth=2, embed_dim=48, num_heads=2, img_size=32).state_dict()
    torch.save(weights, tmp_path / "w.pth")
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "photo.png")
    assert main(["attention", "--checkpoint", str(tmp_path / "w.pth"), "--backbone", "dino_vits16", "--set",
                 "depth=2", "embed_dim=48", "num_heads=2", "img_size=32", "--images", str(tmp_path / "photo.png"),
                 "--output", str(tmp_path / "maps.png")]) == 0
    out = capsys.readouterr().out
    assert "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in out  # not Fashion-MNIST's, never asked for
    assert (tmp_path / "maps.png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
@pytest.mark.parametrize("command", [["features", "x.png", "--output", "f"], ["pca", "x.png"],
                                     ["attention"], ["eval", "knn", "--data", "fashion_mnist"]])
def test_device_cuda_without_a_gpu_is_one_line_for_every_command(tmp_path, capsys, command):
    assert main([*command, "--checkpoint", str(tmp_path / "w.pth"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda, but no CUDA device is visible: use --device cpu" in err


def test_unknown_architecture_asks_for_a_name(tmp_path, capsys):
    weights = create_backbone("vit_tiny", depth=3, embed_dim=48, num_heads=3).state_dict()
    torch.save(weights, tmp_path / "w.pth")
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "w.pth"), "--data", "fashion_mnist"]) == 2
    assert "pass --backbone NAME" in capsys.readouterr().err


def test_class_token_attention_skips_registers_and_masks_hold_the_mass():
    model = create_backbone("vit_tiny", depth=2, img_size=32, patch_size=8, num_register_tokens=3).eval()
    attention = class_token_attention(model, torch.randn(2, 3, 32, 48))
    assert attention.shape == (2, 3, 4, 6)
    full = model.get_last_self_attention(torch.randn(1, 3, 32, 32))
    assert full.shape[-1] == 1 + 3 + 16
    masks = threshold_masks(attention, 0.6)
    flat, kept = attention.flatten(2), masks.flatten(2)
    share = (flat * kept).sum(-1) / flat.sum(-1)
    assert (share >= 0.6 - 1e-6).all()
    # minimal: dropping the weakest kept patch falls below the threshold
    weakest = torch.where(kept, flat, torch.full_like(flat, float("inf"))).min(-1).values
    assert (((flat * kept).sum(-1) - weakest) / flat.sum(-1) < 0.6 + 1e-6).all()


def test_linear_probe_learns_separable_features_and_features_concatenate_blocks():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=generator) * 3
    labels = torch.randint(0, 4, (400,), generator=generator)
    features = centers[labels] + torch.randn(400, 8, generator=generator)
    result = linear_probe(features[:300], labels[:300], features[300:], labels[300:], epochs=20)
    assert result["top1"] > 90
    model = create_backbone("vit_tiny", depth=3, img_size=16, patch_size=4).eval()
    with torch.no_grad():
        assert linear_features(model, torch.randn(2, 3, 16, 16), 3, avgpool=True).shape == (2, 4 * 192)


def test_attention_never_draws_another_image_in_place_of_an_unreadable_one(trained_run, tmp_path, capsys):
    from PIL import Image

    good, bad, text = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "notes.jpg"
    Image.new("L", (40, 30), 200).save(good)
    bad.write_bytes(b"not a png at all")
    text.write_text("hello")
    figure = tmp_path / "attention.png"
    assert main(["attention", "--checkpoint", str(trained_run / LATEST), "--images", str(bad), str(good),
                 "--output", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "attention maps of 1 image(s)" in out and f"left out 1 unreadable image(s): {bad}" in out
    assert main(["attention", "--checkpoint", str(trained_run / LATEST), "--images", str(text),
                 "--output", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could be read" in err and "not an image file" in err
    assert not (tmp_path / "none.png").exists()


def test_features_rows_come_from_the_images_they_name(tmp_path):
    """Each row is its own image's (an unreadable file gives none), for kNN, classifiers and embeddings alike."""
    from PIL import Image

    from distill.data.datasets import FileImages
    from distill.data.eval_views import EvalView
    from distill.eval.features import extract_source_features

    paths = [tmp_path / f"{i}.png" for i in range(5)]
    for i, path in enumerate(paths):
        Image.new("L", (8, 8), 40 * i).save(path)
    paths[1].write_bytes(b"broken")
    source = FileImages([str(p) for p in paths], [0, 1, 2, 3, 4], [str(i) for i in range(5)], "five")
    mean_pixel = lambda images: images.mean(dim=(1, 2, 3))[:, None]  # noqa: E731
    features, labels, indices = extract_source_features(mean_pixel, source, EvalView(8, [0.0], [1.0], 1),
                                                        batch_size=2, with_indices=True)
    assert indices.tolist() == [0, 2, 3, 4] and labels.tolist() == [0, 2, 3, 4]
    assert torch.allclose(features[:, 0], torch.tensor([0, 80, 120, 160]) / 255.0, atol=1e-3)
