"""`distill eval retrieval`: a backbone's descriptors of query and gallery images ranked against a ground truth;
exact copies must come first whatever the (random) network, so mAP, recall@k and µAP are known."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main
from distill.models import create_backbone

TINY = dict(embed_dim=32, num_heads=2, patch_size=4, img_size=16, in_chans=1)
DIMS = ["--backbone", "vit_tiny", "--set", "depth=2", "embed_dim=32", "num_heads=2", "patch_size=4", "img_size=16",
        "in_chans=1", "--image-size", "16", "--mean", "0.5", "--std", "0.25", "--num-workers", "0",
        "--precision", "fp32"]


@pytest.fixture()
def sets(tmp_path):
    torch.manual_seed(0)
    torch.save(create_backbone("vit_tiny", depth=2, **TINY).state_dict(), tmp_path / "backbone.pth")
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(10)]
    pictures[6] = pictures[5]  # a duplicate inside the gallery: both are copies of query q2
    (tmp_path / "gallery").mkdir()
    (tmp_path / "queries").mkdir()
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / "gallery" / f"g{i}.png")
    for name, source in (("q0", 0), ("q1", 3), ("q2", 5)):
        Image.fromarray(pictures[source]).save(tmp_path / "queries" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "queries" / "q3.png")
    return tmp_path


def _run(tmp_path, truth_lines, *extra):
    (tmp_path / "truth.tsv").write_text("".join(line + "\n" for line in truth_lines))
    return main(["eval", "retrieval", "--checkpoint", str(tmp_path / "backbone.pth"), *DIMS,
                 "--queries", str(tmp_path / "queries"), "--gallery", str(tmp_path / "gallery"),
                 "--truth", str(tmp_path / "truth.tsv"), "--k", "5", "--output", str(tmp_path / "out.json"), *extra])


@pytest.mark.parametrize("descriptor", ["cls", "copy"])
def test_copies_are_found_first_and_the_figures_say_so(sets, capsys, descriptor):
    # paths from the truth file's folder, paths from the set's folder, and an image number of the gallery (g3 is
    # the fourth file of the sorted folder); q3 has no pair: skipped and counted
    truth = ["queries/q0.png\tgallery/g0.png", "q1.png\t3", "queries/q2.png\tg5.png", f"{sets}/queries/q2.png\tg6.png"]
    assert _run(sets, truth, "--descriptor", descriptor) == 0
    out = capsys.readouterr().out
    results = json.loads((sets / "out.json").read_text())
    assert results["queries"] == 4 and results["queries_evaluated"] == 3 and results["queries_without_truth"] == 1
    assert results["truth_pairs"] == 4 and results["predictions"] == 20
    # every relevant item is an exact copy (cosine 1): ranks 1 (and 1-2 for the duplicate): all figures are 1
    assert results["mAP"] == pytest.approx(1.0) and results["microAP"] == pytest.approx(1.0)
    assert all(results[f"recall@{k}"] == 1.0 for k in (1, 5, 10))
    assert "mAP        1.0000" in out and "(3 queries with a relevant item; 1 without, skipped)" in out


def test_a_wrong_pair_lowers_the_figures_by_its_rank(sets, capsys):
    # q0 paired with g1 only (not its copy): g0 takes rank 1, so g1 is at rank >= 2 (or not in the top 5)
    assert _run(sets, ["queries/q0.png\tgallery/g1.png", "queries/q1.png\tgallery/g3.png"]) == 0
    results = json.loads((sets / "out.json").read_text())
    assert results["recall@1"] == 0.5 and results["mAP"] <= (1.0 + 0.5) / 2


def test_a_truth_naming_an_image_not_in_the_set_is_one_line_and_status_2(sets, capsys):
    assert _run(sets, ["queries/q0.png\tgallery/missing.png"]) == 2
    said = capsys.readouterr()
    err = said.err
    assert err.count("\n") == 1 and "'gallery/missing.png'" in err and "--gallery" in err
    assert "backbone from" not in said.out  # found before the network is loaded and any image encoded
    assert not (sets / "out.json").exists()
    assert _run(sets, ["queries/q0.png gallery/g0.png"]) == 2
    assert "not two fields" in capsys.readouterr().err
