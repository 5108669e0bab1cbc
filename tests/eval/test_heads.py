"""Linear heads that last: saved with the recipe of their features by `distill eval linear --save-head`, reloaded by
`distill eval classify`; DINO's and DINOv2's released head layouts give the logits of their official formulas; a
DeiT classifier is evaluated as it is."""

import json

import pytest
import torch

from distill.cli import main
from distill.engine.checkpointing import LATEST
from distill.engine.trainer import Trainer
from distill.errors import InputError
from distill.eval.heads import HeadClassifier, HeadRecipe, class_order, load_linear_head, save_linear_head
from distill.models import create_backbone, read_checkpoint

TINY = dict(embed_dim=32, num_heads=2, patch_size=4, img_size=16, in_chans=1)
DIMS = ["--set", "depth=2", "embed_dim=32", "num_heads=2", "patch_size=4", "img_size=16", "in_chans=1"]
SUBSETS = ["--data", "fashion_mnist", "--val-limit", "200", "--num-workers", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from distill.engine.train_config import load_train_config
    from tests.tiny_dino import UNIT_RUN

    folder = tmp_path_factory.mktemp("run")
    Trainer(load_train_config(None, UNIT_RUN + [f"train.output_dir={folder}", "train.max_steps=4"])).run()
    return folder


def _normed_blocks(model, images):
    """The normalised token sequence [B, N, D] after each block, run block by block (no library shortcut)."""
    tokens, _ = model.prepare_tokens(images)
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(model.norm(tokens))
    return outputs


def _random_head(classes, features):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(classes, features, generator=generator), torch.randn(classes, generator=generator)


@torch.no_grad()
def test_dino_vit_small_head_takes_the_class_tokens_of_the_last_four_blocks(tmp_path):
    model = create_backbone("vit_tiny", depth=5, **TINY).eval()
    weight, bias = _random_head(7, 4 * 32)
    path = tmp_path / "dino_deitsmall16_linearweights.pth"
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": weight, "module.linear.bias": bias},
                "best_acc": 79.7}, path)
    head = load_linear_head(path, model)
    assert (head.layout, head.recipe.n_last_blocks, head.recipe.avgpool, head.recipe.image_size) == ("dino", 4,
                                                                                                     False, 224)
    images = torch.randn(3, 1, 16, 16)
    # facebookresearch/dino eval_linear.py: torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
    intermediate_output = _normed_blocks(model, images)[-4:]
    expected = torch.cat([x[:, 0] for x in intermediate_output], dim=-1) @ weight.T + bias
    assert torch.allclose(HeadClassifier(model, head)(images), expected, atol=1e-5)


@torch.no_grad()
def test_dino_vit_base_head_interleaves_the_class_token_and_the_pooled_patches(tmp_path):
    model = create_backbone("vit_tiny", depth=2, **TINY).eval()
    weight, bias = _random_head(5, 2 * 32)
    path = tmp_path / "dino_vitbase16_linearweights.pth"
    torch.save({"state_dict": {"module.linear.weight": weight, "module.linear.bias": bias}}, path)
    head = load_linear_head(path, model)
    assert (head.recipe.n_last_blocks, head.recipe.avgpool) == (1, True)
    images = torch.randn(3, 1, 16, 16)
    # facebookresearch/dino eval_linear.py, n_last_blocks=1 with avgpool_patchtokens, verbatim
    intermediate_output = _normed_blocks(model, images)[-1:]
    output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
    output = torch.cat((output.unsqueeze(-1), torch.mean(intermediate_output[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
    output = output.reshape(output.shape[0], -1)
    expected = output @ weight.T + bias
    assert torch.allclose(HeadClassifier(model, head)(images), expected, atol=1e-5)
    concatenated = torch.cat([output[:, 0::2], output[:, 1::2]], dim=1)  # read as [cls | mean], it would differ
    assert not torch.allclose(concatenated @ weight.T + bias, expected, atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("blocks", [1, 4])
def test_dinov2_heads_take_class_tokens_and_the_mean_patch_token_without_registers(tmp_path, blocks):
    model = create_backbone("vit_tiny", depth=4, num_register_tokens=2, **TINY).eval()
    weight, bias = _random_head(6, (blocks + 1) * 32)
    path = tmp_path / f"dinov2_vits14_reg4_linear{blocks if blocks == 4 else ''}_head.pth"
    torch.save({"weight": weight, "bias": bias}, path)
    head = load_linear_head(path, model)
    assert (head.layout, head.recipe.n_last_blocks, head.recipe.avgpool) == ("dinov2", blocks, True)
    images = torch.randn(2, 1, 16, 16)
    # facebookresearch/dinov2 hub/classifiers.py: [cls of each block..., mean of the last block's patch tokens]
    outputs = _normed_blocks(model, images)[-blocks:]
    linear_input = torch.cat([x[:, 0] for x in outputs] + [outputs[-1][:, 1 + 2:].mean(dim=1)], dim=1)
    if blocks == 1:  # the official layers=1 path reads forward_features
        features = model.forward_features(images)
        official = torch.cat([features["x_norm_clstoken"], features["x_norm_patchtokens"].mean(dim=1)], dim=1)
        assert torch.allclose(official, linear_input, atol=1e-5)
    expected = linear_input @ weight.T + bias
    assert torch.allclose(HeadClassifier(model, head)(images), expected, atol=1e-5)


@torch.no_grad()
def test_dino_resnet_head_takes_the_pooled_embedding(tmp_path):
    """dino_resnet50_linearweights.pth: eval_linear.py feeds model(inp), the pooled embedding (fc removed)."""
    model = create_backbone("resnet18", in_chans=1).eval()
    weight, bias = _random_head(5, 512)
    path = tmp_path / "dino_resnet_linearweights.pth"
    torch.save({"state_dict": {"module.linear.weight": weight, "module.linear.bias": bias}}, path)
    head = load_linear_head(path, model)
    images = torch.randn(2, 1, 32, 32)
    assert torch.allclose(HeadClassifier(model, head)(images), model(images) @ weight.T + bias, atol=1e-5)


@pytest.mark.parametrize("name, state, said", [
    ("dinov2_vits14_linear_head.pth", {"weight": torch.zeros(10, 768), "bias": torch.zeros(10)},
     "takes 768-d features but the backbone gives 32-d tokens: (1 + 1) x 32 or (4 + 1) x 32"),
    ("dino_deitsmall16_linearweights.pth",
     {"state_dict": {"module.linear.weight": torch.zeros(10, 4 * 32), "module.linear.bias": torch.zeros(10)}},
     "takes 128-d features but the backbone gives 32-d tokens from only 2 blocks (the head reads 4 class tokens"),
    ("dino_odd_linearweights.pth",
     {"state_dict": {"module.linear.weight": torch.zeros(10, 100), "module.linear.bias": torch.zeros(10)}},
     "takes 100-d features but the backbone gives n class tokens x 32"),
])
def test_a_released_head_that_does_not_fit_the_backbone_is_one_line_and_status_2(tmp_path, capsys, name, state,
                                                                                  said):
    """Its width, or the blocks its recipe reads, checked before any image is encoded."""
    torch.save(create_backbone("vit_tiny", depth=2, **TINY).state_dict(), tmp_path / "backbone.pth")
    torch.save(state, tmp_path / name)
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / "backbone.pth"), "--backbone", "vit_tiny", *DIMS,
                 "--head", str(tmp_path / name), "--data", "fashion_mnist", "--val-limit", "8",
                 "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "use the backbone the head was trained on" in err


def test_a_saved_head_reads_back_whole_with_weights_only(tmp_path):
    model = create_backbone("vit_tiny", depth=2, **TINY).eval()
    layer = torch.nn.Linear(3 * 32, 4)
    recipe = HeadRecipe(2, True, 16, [0.286], [0.353], 256 / 224, ["a", "b", "c", "d"])
    path = save_linear_head(tmp_path / "heads" / "head.pth", layer, recipe, {"top1": 50.0})
    assert [p.name for p in path.parent.iterdir()] == ["head.pth"]  # no temporary file left beside it
    raw = torch.load(path, weights_only=True)  # tensors and plain values only
    assert raw["format"] == "distill-linear-head-1" and raw["class_names"] == ["a", "b", "c", "d"]
    head = load_linear_head(path, model)
    assert head.recipe == recipe and head.notes == {"top1": 50.0}
    assert torch.equal(head.weight, layer.weight.detach()) and torch.equal(head.bias, layer.bias.detach())
    wider = create_backbone("vit_tiny", depth=2, **{**TINY, "embed_dim": 48, "num_heads": 3})
    with pytest.raises(InputError, match=r"takes 96-d features but the backbone gives 144-d features"):
        load_linear_head(path, wider)
    with pytest.raises(InputError, match="3 class names for a head of 4 outputs"):
        save_linear_head(tmp_path / "bad.pth", layer, HeadRecipe(class_names=["a", "b", "c"]))
    assert not (tmp_path / "bad.pth").exists()


def test_head_outputs_follow_the_data_classes():
    assert class_order(["cat", "dog"], ["cat", "dog"], 2) is None
    assert class_order(["cat", "dog", "owl"], ["dog", "cat"], 3) == [1, 0, 2]
    assert class_order(["cat", "dog"], ["0", "1"], 2) is None  # integer labels are indices
    with pytest.raises(InputError, match=r"1 class\(es\) the head does not know \(emu\)"):
        class_order(["cat", "dog"], ["cat", "emu"], 2)


def test_a_head_saved_by_eval_linear_gives_the_same_top1_in_eval_classify(trained_run, tmp_path, capsys):
    head, linear_json, classify_json = tmp_path / "head.pth", tmp_path / "linear.json", tmp_path / "classify.json"
    assert main(["eval", "linear", "--checkpoint", str(trained_run / LATEST), *SUBSETS, "--train-limit", "600",
                 "--n-last-blocks", "2", "--avgpool", "--epochs", "5", "--save-head", str(head),
                 "--output", str(linear_json)]) == 0
    assert f"linear head (10 classes over 96-d features) written to {head}" in capsys.readouterr().out
    stored = torch.load(head, weights_only=True)
    assert (stored["n_last_blocks"], stored["avgpool"], stored["image_size"], stored["mean"]) == (2, True, 16, [0.286])
    assert stored["std"] == [0.353] and stored["resize_ratio"] >= 1.0
    assert stored["class_names"][0] == "T-shirt/top" and len(stored["class_names"]) == 10
    assert main(["eval", "classify", "--checkpoint", str(trained_run / LATEST), "--head", str(head), *SUBSETS,
                 "--output", str(classify_json)]) == 0
    printed = capsys.readouterr().out
    assert "2 class tokens + the mean patch token x 32" in printed and "16 px views, mean [0.286]" in printed
    linear = json.loads(linear_json.read_text())["linear"]
    classified = json.loads(classify_json.read_text())["classify"]
    assert 10.0 < linear["top1"] <= 100.0
    assert classified["top1"] == linear["top1"] and classified["top5"] == linear["top5"]
    # the same head on a backbone of another width: one line naming both widths
    wider = create_backbone("vit_tiny", depth=2, **{**TINY, "embed_dim": 48, "num_heads": 3})
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    wide_dims = [d if not d.startswith(("embed_dim", "num_heads")) else d.replace("32", "48").replace("=2", "=3")
                 for d in DIMS]
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / "wider.pth"), "--backbone", "vit_tiny",
                 *wide_dims, "--head", str(head), *SUBSETS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes 96-d features" in err and "gives 144-d features" in err


def test_a_deit_run_is_classified_as_its_own_validation_scored_it(tmp_path, capsys):
    from distill.engine.train_config import load_train_config
    from tests.objectives.test_deit import TINY_DEIT

    Trainer(load_train_config(None, TINY_DEIT + [f"train.output_dir={tmp_path}", "train.max_steps=2"])).run()
    reported = json.loads((tmp_path / "results.json").read_text())["val"]["student"]
    out = tmp_path / "classify.json"
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / LATEST), "--data", "fashion_mnist",
                 "--val-split", "test", "--val-limit", "64", "--num-workers", "0", "--precision", "fp32",
                 "--output", str(out)]) == 0
    assert "distilled classifier (mean of its two heads)" in capsys.readouterr().out
    classified = json.loads(out.read_text())["classify"]
    assert classified["top1"] == pytest.approx(reported["top1"], abs=1e-9)
    assert classified["loss"] == pytest.approx(reported["loss"], rel=1e-5)
    # the student in DeiT's release layout ({"model": ...}), with its name given: the same numbers
    student = {k[len("student."):]: v for k, v in read_checkpoint(tmp_path / LATEST)["objective"].items()
               if k.startswith("student.")}
    torch.save({"model": student}, tmp_path / "deit.pth")
    deit_dims = ["--set", "depth=2", "embed_dim=32", "num_heads=2", "patch_size=7", "img_size=28", "in_chans=1"]
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / "deit.pth"), "--backbone", "vit_tiny",
                 *deit_dims, "--mean", "0.286", "--std", "0.353", "--data", "fashion_mnist", "--val-split", "test",
                 "--val-limit", "64", "--num-workers", "0", "--precision", "fp32", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["classify"]["top1"] == pytest.approx(reported["top1"], abs=1e-9)
    # a backbone without a classifier needs a head
    torch.save({k: v for k, v in student.items() if not k.startswith("head")}, tmp_path / "backbone.pth")
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / "backbone.pth"), "--backbone", "vit_tiny",
                 *deit_dims, "--data", "fashion_mnist", "--val-limit", "8"]) == 2
    assert "holds no classifier (no head.weight): pass --head" in capsys.readouterr().err


def test_a_head_names_its_classes_and_follows_the_data_order(tmp_path, capsys):
    """A head trained with classes (dog, cat) scores an ImageFolder tree whose labels are sorted (cat=0, dog=1)."""
    from PIL import Image

    for name, count in (("cat", 1), ("dog", 3)):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (16, 16), 30 * i).save(tmp_path / "val" / name / f"{i}.png")
    model = create_backbone("vit_tiny", depth=2, **TINY)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    layer = torch.nn.Linear(32, 2)
    with torch.no_grad():  # always "dog"
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([5.0, 0.0]))
    save_linear_head(tmp_path / "head.pth", layer, HeadRecipe(1, False, 16, [0.5], [0.25], 1.0, ["dog", "cat"]))
    out = tmp_path / "classify.json"
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / "backbone.pth"), "--backbone", "vit_tiny", *DIMS,
                 "--head", str(tmp_path / "head.pth"), "--data", str(tmp_path), "--num-workers", "0",
                 "--output", str(out)]) == 0
    assert "head outputs reordered to the data's classes (cat, dog" in capsys.readouterr().out
    assert json.loads(out.read_text())["classify"]["top1"] == 75.0
    save_linear_head(tmp_path / "other.pth", layer, HeadRecipe(1, False, 16, [0.5], [0.25], 1.0, ["dog", "emu"]))
    assert main(["eval", "classify", "--checkpoint", str(tmp_path / "backbone.pth"), "--backbone", "vit_tiny", *DIMS,
                 "--head", str(tmp_path / "other.pth"), "--data", str(tmp_path), "--num-workers", "0"]) == 2
    assert "the data has 1 class(es) the head does not know (cat)" in capsys.readouterr().err
