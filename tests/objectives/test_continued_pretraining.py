"""Continued pretraining: model.pretrained of a DINO or DINOv2 recipe restores the projection heads of the file
(DINO's training checkpoint, DINOv2's teacher_checkpoint.pth, a run of this project) or starts fresh ones on a
bare backbone, and objective.freeze_backbone_epochs trains fresh heads alone first."""

import argparse
import logging

import pytest
import torch

from distill.cli import main
from distill.engine.checkpointing import LATEST
from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer
from distill.errors import CheckpointError, InputError
from distill.models import create_backbone
from distill.models.heads import DINOHead
from distill.objectives import build_objective
from tests.objectives.test_dinov2 import TINY_DINOV2
from tests.tiny_dino import UNIT_RUN

DIMS = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16, in_chans=1)
RECIPE = "configs/dinov2/vits14_continued_pretraining.yaml"


def randomised(module: torch.nn.Module) -> dict:
    """The module's state dict with every float tensor replaced by random values (nothing equals a fresh init)."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same(module: torch.nn.Module, expected: dict, skip=("mask_token",)) -> None:
    own = {k: v for k, v in module.state_dict().items() if k not in skip}
    assert set(own) == set(expected) - set(skip)
    for key, value in own.items():
        assert torch.equal(value, expected[key]), key


def dino_training_checkpoint(path, out_dim=64) -> dict:
    """A checkpoint in the layout of facebookresearch/dino main_dino.py from random weights: the DDP-wrapped student
    (module.backbone.*, module.head.*), the teacher (backbone.*, head.*), the optimizer, epoch, args and loss.
    Returns each network's state without the module. prefix."""
    networks = {}
    for role in ("student", "teacher"):
        backbone = randomised(create_backbone("vit_tiny", mask_token=False, **DIMS))  # DINO's ViTs: no mask token
        head = randomised(DINOHead(32, out_dim, 32, 16))
        networks[role] = {**prefixed("backbone.", backbone), **prefixed("head.", head)}
    torch.save({"student": prefixed("module.", networks["student"]), "teacher": networks["teacher"],
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", out_dim=out_dim),
                "dino_loss": {"center": torch.zeros(1, out_dim)}}, path)
    return networks


def dinov2_teacher_checkpoint(path, layout="weight_norm") -> dict:
    """{'teacher': ...} as facebookresearch/dinov2 train.py do_test saves it: backbone.* with chunked blocks
    (blocks.<chunk>.<i>.*), dino_head.*, ibot_head.*; the last layers in torch.nn.utils.weight_norm's names, or in
    those of torch.nn.utils.parametrizations.weight_norm. Returns the teacher in this package's names."""
    backbone = randomised(create_backbone("vit_tiny", **DIMS))
    teacher = {**prefixed("backbone.", backbone), **prefixed("dino_head.", randomised(DINOHead(32, 64, 32, 16))),
               **prefixed("ibot_head.", randomised(DINOHead(32, 48, 32, 8)))}
    saved = {k.replace("backbone.blocks.", "backbone.blocks.0."): v for k, v in teacher.items()}
    if layout == "parametrizations":
        saved = {k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
                 .replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1"): v
                 for k, v in saved.items()}
    torch.save({"teacher": saved}, path)
    return teacher


def dino_config(folder, *extra):
    return load_train_config(None, UNIT_RUN + [f"train.output_dir={folder}", *extra])


def dinov2_config(folder, *extra):
    return load_train_config(None, TINY_DINOV2 + [f"train.output_dir={folder}", *extra])


@pytest.mark.parametrize("key", [None, "student"])
def test_a_dino_training_checkpoint_restores_backbone_and_head(tmp_path, key):
    """The teacher by default (as for the backbone alone), the student with model.checkpoint_key=student: both
    networks of the objective start as that network of the file, head included."""
    networks = dino_training_checkpoint(tmp_path / "checkpoint.pth")
    extra = [f"model.checkpoint_key={key}"] if key else []
    objective = build_objective(dino_config(tmp_path / "run", f"model.pretrained={tmp_path / 'checkpoint.pth'}",
                                            *extra))
    expected = networks[key or "teacher"]
    for network in (objective.student, objective.teacher):
        assert_same(network.head, unprefixed("head.", expected))
        assert_same(network.backbone, unprefixed("backbone.", expected))


@pytest.mark.parametrize("layout", ["weight_norm", "parametrizations"])
def test_a_dinov2_teacher_checkpoint_restores_its_dino_and_ibot_heads(tmp_path, layout, caplog):
    teacher = dinov2_teacher_checkpoint(tmp_path / "teacher_checkpoint.pth", layout)
    config = dinov2_config(tmp_path / "run", f"model.pretrained={tmp_path / 'teacher_checkpoint.pth'}",
                           "objective.separate_heads=true", "objective.ibot_out_dim=48",
                           "objective.ibot_bottleneck_dim=8")
    with caplog.at_level(logging.INFO, logger="distill"):
        objective = build_objective(config)
    for network in (objective.student, objective.teacher):
        assert_same(network.backbone, unprefixed("backbone.", teacher), skip=())  # the mask token too
        assert_same(network.dino_head, unprefixed("dino_head.", teacher))
        assert_same(network.ibot_head, unprefixed("ibot_head.", teacher))
    assert any("restored the projection head(s) dino_head, ibot_head" in r.getMessage() for r in caplog.records)


def test_a_dinov2_recipe_with_one_shared_head_takes_the_dino_head_and_says_what_it_left(tmp_path, caplog):
    teacher = dinov2_teacher_checkpoint(tmp_path / "teacher_checkpoint.pth")
    with caplog.at_level(logging.INFO, logger="distill"):
        objective = build_objective(dinov2_config(tmp_path / "run",
                                                  f"model.pretrained={tmp_path / 'teacher_checkpoint.pth'}"))
    assert objective.student.ibot_head is None
    assert_same(objective.teacher.dino_head, unprefixed("dino_head.", teacher))
    assert any("ibot_head left out" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_a_run_of_this_project_restores_its_evaluated_network(tmp_path, name):
    """Its checkpoint.pth: the network that holds the evaluated backbone (the teacher), heads included."""
    config = dino_config if name == "dino" else dinov2_config
    Trainer(config(tmp_path / "first", "train.max_steps=2")).run()
    saved = torch.load(tmp_path / "first" / LATEST, weights_only=False)["objective"]
    objective = build_objective(config(tmp_path / "second", f"model.pretrained={tmp_path / 'first' / LATEST}"))
    teacher = unprefixed("teacher.", saved)
    for network in (objective.student, objective.teacher):
        assert_same(network, teacher, skip=())
    assert not torch.equal(saved["student.backbone.cls_token"], saved["teacher.backbone.cls_token"])  # not trivially


def _classifier_file(path):
    """A DeiT-style classifier (a backbone with head.weight / head.bias) under 'model'."""
    state = randomised(create_backbone("vit_tiny", mask_token=False, **DIMS))
    torch.save({"model": {**state, "head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)}}, path)
    return state


def _backbone_file(path):
    state = randomised(create_backbone("vit_tiny", **DIMS))
    torch.save(state, path)
    return state


@pytest.mark.parametrize("write", [_backbone_file, _classifier_file])
def test_a_file_without_projection_heads_gives_fresh_heads_and_says_so(tmp_path, write, caplog):
    """A released backbone (or a classifier, whose head.weight is no projection head): its backbone, and the heads a
    run without model.pretrained starts with."""
    backbone = write(tmp_path / "backbone.pth")
    torch.manual_seed(0)
    scratch = build_objective(dino_config(tmp_path / "scratch"))
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="distill"):
        objective = build_objective(dino_config(tmp_path / "run", f"model.pretrained={tmp_path / 'backbone.pth'}"))
    assert_same(objective.student.backbone, backbone)
    assert_same(objective.student.head, scratch.student.head.state_dict())
    assert_same(objective.teacher.head, scratch.student.head.state_dict())
    notices = [r.getMessage() for r in caplog.records if "holds no projection heads" in r.getMessage()]
    assert len(notices) == 1 and "head start fresh" in notices[0] and "freeze_backbone_epochs" in notices[0]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _all_changed(module, before):
    """Every weight moved, but the ones that never train: DINO's unused mask token, the fixed norms of the
    prototypes (norm_last_layer)."""
    return all(not torch.equal(v, before[k]) for k, v in module.state_dict().items()
               if v.is_floating_point() and k != "mask_token" and not k.endswith("last_layer.weight_g"))


def _all_equal(module, before):
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_freeze_backbone_epochs_trains_the_heads_alone_first(tmp_path, name):
    """A released backbone, fresh heads, 2 epochs, the first with the backbone frozen: after it the student's
    backbone is as loaded and the teacher's still equals it (an EMA of equal weights), while both networks' heads
    moved; after the second epoch every backbone weight moved too."""
    _backbone_file(tmp_path / "backbone.pth")
    config = dino_config if name == "dino" else dinov2_config
    trainer = Trainer(config(tmp_path / "run", f"model.pretrained={tmp_path / 'backbone.pth'}", "train.epochs=2",
                             "objective.freeze_backbone_epochs=1", "objective.freeze_last_layer_epochs=0",
                             "optim.warmup_epochs=0"))
    trainer.setup()
    student, teacher = trainer.objective.student, trainer.objective.teacher
    heads = ["head"] if name == "dino" else ["dino_head"]
    backbone = _state(student.backbone)
    student_heads = {h: _state(getattr(student, h)) for h in heads}
    teacher_heads = {h: _state(getattr(teacher, h)) for h in heads}
    epoch = trainer.steps_per_epoch
    trainer.config.train.max_steps = epoch
    trainer.train()
    assert trainer.step == epoch
    assert _all_equal(student.backbone, backbone)
    assert _all_equal(teacher.backbone, backbone)
    for h in heads:
        assert _all_changed(getattr(student, h), student_heads[h]), h
        assert _all_changed(getattr(teacher, h), teacher_heads[h]), h
    trainer.config.train.max_steps, trainer.stop_reason = 2 * epoch, None
    trainer.train()
    assert trainer.step == 2 * epoch
    assert _all_changed(student.backbone, backbone)
    assert _all_changed(teacher.backbone, backbone)
    assert not _all_equal(teacher.backbone, _state(student.backbone))  # the teacher follows, lagging behind


def test_a_negative_freeze_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(InputError) as error:
        dino_config(tmp_path, "objective.freeze_backbone_epochs=-1")
    assert "objective.freeze_backbone_epochs is -1" in str(error.value) and "\n" not in str(error.value)


def test_a_head_of_other_sizes_names_the_key_shapes_and_options(tmp_path):
    """Trained heads are not dropped silently: the error says which option takes the file's head, and which one
    starts fresh heads instead (which then works, on the file's backbone)."""
    networks = dino_training_checkpoint(tmp_path / "checkpoint.pth", out_dim=64)
    pretrained = f"model.pretrained={tmp_path / 'checkpoint.pth'}"
    with pytest.raises(CheckpointError) as error:
        build_objective(dino_config(tmp_path / "run", pretrained, "objective.out_dim=128"))
    message = str(error.value)
    assert "\n" not in message
    assert "its head does not fit this recipe's head" in message
    assert "last_layer.weight_v [64, 16] in the file, [128, 16] here" in message
    assert "set objective.out_dim=64 to continue with the file's head" in message
    assert "objective.restore_heads=false" in message
    objective = build_objective(dino_config(tmp_path / "run", pretrained, "objective.out_dim=128",
                                            "objective.restore_heads=false"))
    assert_same(objective.student.backbone, unprefixed("backbone.", networks["teacher"]))
    assert objective.student.head.last_layer.weight_v.shape == (128, 16)


def test_a_shared_dinov2_head_of_other_sizes_names_both_prototype_counts(tmp_path, capsys):
    """`distill train`: exit status 2, one line; a shared head's prototypes are out_dim and ibot_out_dim at once."""
    dinov2_teacher_checkpoint(tmp_path / "teacher_checkpoint.pth")
    status = main(["train", *TINY_DINOV2, f"train.output_dir={tmp_path / 'run'}", "objective.out_dim=32",
                   "objective.ibot_out_dim=32", f"model.pretrained={tmp_path / 'teacher_checkpoint.pth'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert "its dino_head does not fit this recipe's dino_head" in lines[0]
    assert "set objective.out_dim=64 objective.ibot_out_dim=64" in lines[0]


def test_the_continued_pretraining_recipe(tmp_path):
    """The recipe starts from a released DINOv2 backbone (a placeholder path to replace), freezes it for a while,
    and its backbone is the one of the released files; with the model made tiny it builds and takes such a file."""
    config = load_train_config(RECIPE)
    assert config.objective.name == "dinov2" and config.model.backbone.startswith("dinov2_vit")
    assert config.model.pretrained and config.objective.freeze_backbone_epochs > 0
    assert 0 < config.objective.freeze_backbone_epochs < config.train.epochs
    dims = "{depth: 2, embed_dim: 32, num_heads: 2, patch_size: 14, img_size: 28}"
    hub = create_backbone(config.model.backbone, depth=2, embed_dim=32, num_heads=2, patch_size=14, img_size=28)
    torch.save(randomised(hub), tmp_path / "dinov2_pretrain.pth")
    hub_file = f"model.pretrained={tmp_path / 'dinov2_pretrain.pth'}"
    small = load_train_config(RECIPE, [f"model.overrides={dims}", hub_file, "objective.out_dim=64",
                                       "objective.ibot_out_dim=64", "objective.hidden_dim=32"])
    objective = build_objective(small)
    assert_same(objective.student.backbone, torch.load(tmp_path / "dinov2_pretrain.pth", weights_only=True), skip=())
