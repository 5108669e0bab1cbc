"""The `distill` command as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import main

DISTILL = Path(sys.executable).parent / "distill"


def test_console_script_is_installed_and_lists_models():
    result = subprocess.run([str(DISTILL), "models", "--filter", "dino_vits*"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "family"]
    row = next(line for line in lines if line.startswith("dino_vits16 "))
    assert row.split()[1:] == ["dino", "21.67", "224", "4.61"]
    assert any(line.startswith("dino_vits8 ") for line in lines)


def test_models_without_flops_covers_the_whole_registry(capsys):
    assert main(["models", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vitg14_reg" in out and "1136.49" in out and "deit_base_distilled_patch16_384" in out


def test_bad_input_is_one_line_and_exit_status_2(capsys, tmp_path):
    assert main(["models", "--filter", "convnext*"]) == 2
    assert "no backbone matches 'convnext*'" in capsys.readouterr().err
    assert main(["baseline", "configs/demo/baseline.yaml", "seeds=[0]", "learning_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill baseline: error: unknown config key 'learning_rate'") and "\n" not in err
    assert main(["baseline", "backbone=vit_smal", f"output_dir={tmp_path}"]) == 2
    assert "did you mean vit_small" in capsys.readouterr().err


def _recipe_mistakes(tmp_path):
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "section.yaml").write_text("objective: dinov2\n")
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16)).save(flat / f"{i}.png")
    demo = "configs/demo/dino_fashion_mnist.yaml"
    return [
        ([str(tmp_path / "list.yaml")], "holds a YAML list, not a recipe"),
        ([str(tmp_path / "section.yaml")], "config key 'objective' in"),
        ([str(tmp_path)], "is a folder: give a YAML recipe"),
        ([demo, "objective=dinov2"], "is a section of keys, not a value: set one of them, e.g. objective.name=dinov2"),
        ([demo, "model.pretrained=nowhere.pth"], "model.pretrained nowhere.pth does not exist"),
        ([demo, "data.dataset.kind=imagefolder", f"data.dataset.path={flat}"],
         "has no class sub-folders, but data.dataset.kind is imagefolder"),
        ([demo, f"data.dataset.path={flat / '0.png'}", "data.dataset.kind=filelist"], "0.png is one image"),
    ]


def test_recipe_mistakes_say_what_was_given_and_what_to_give(tmp_path, capsys):
    for argv, words in _recipe_mistakes(tmp_path):
        assert main(["train", *argv, f"train.output_dir={tmp_path / 'run'}"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("distill train: error:") and "\n" not in err and words in err, (argv, err)
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_in_the_run_folder_says_to_move_it_away(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"PK\x03\x04 not a whole file")
    argv = ["train", "configs/demo/dino_fashion_mnist.yaml", f"train.output_dir={run}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated or corrupt" in err and "move it away" in err and "checkpoint_NNNN.pth" in err, err
    assert main(argv + ["train.resume=never"]) == 2
    assert "move it away" in capsys.readouterr().err
    assert (run / "checkpoint.pth").read_bytes() == b"PK\x03\x04 not a whole file"


@pytest.mark.slow
def test_baseline_study_on_a_slice_of_fashion_mnist(tmp_path, capsys):
    code = main(["baseline", "configs/demo/baseline.yaml", "seeds=[0,1]", "train_limit=3000", "test_limit=500",
                 "ks=[5,20]", f"output_dir={tmp_path}"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    pixels, vit, vit_other_seed = results["rows"]
    assert pixels["features"] == "raw pixels" and pixels["dim"] == 784 and vit["dim"] == 192
    assert vit["knn"]["20"] != vit_other_seed["knn"]["20"]  # two different random initialisations
    assert pixels["knn"]["20"]["top1"] > 70  # raw pixels are a strong baseline even on 3,000 images
    assert 10 < vit["knn"]["20"]["top1"] < pixels["knn"]["20"]["top1"]  # random features: above chance, below pixels
    assert (tmp_path / "knn_baseline.png").stat().st_size > 10_000
    assert "seeds:\n- 0\n- 1" in (tmp_path / "config.yaml").read_text()
    out = capsys.readouterr().out
    assert "raw pixels" in out and "random-init, 2 seeds: k=20 top-1" in out
