"""Fully sharded runs (train.parallel=fsdp) over 2 gloo processes: the same losses and weights as one process with
the same global batch, checkpoints in the unsharded layout that resume sharded or not on another number of
processes, and for DINOv2 (backbone methods besides forward, accumulated micro-batches, bf16) the run DDP gives."""

import pytest
import torch

from distill.engine.checkpointing import LATEST
from distill.engine.sharding import shard_units
from distill.engine.train_config import load_train_config
from distill.errors import InputError
from distill.models import read_checkpoint
from distill.models.classifiers import create_classifier
from distill.models.layers import Block
from distill.models.vit import VisionTransformer
from distill.objectives import build_objective
from tests.distributed.ranks import image_folder, run_ranks
from tests.objectives.test_dinov2 import TINY_DINOV2
from tests.tiny_dino import TINY_DINO, losses, tiny_model

DINO = TINY_DINO + [
    tiny_model(0.0), "optim.lr=1e-3", "optim.warmup_epochs=0", "train.epochs=2", "train.max_steps=6",
    "objective.views.mean=[0.286]", "objective.views.std=[0.353]",
]
DINOV2 = [o for o in TINY_DINOV2 if not o.startswith(("data.", "train.precision"))] + [
    "data.num_workers=0", "train.max_steps=4"]


def _same_weights(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), rtol=rtol, atol=atol), key


def _adam_moments(checkpoint):
    return [s["exp_avg"] for _, s in sorted(checkpoint["optimizer"]["state"].items())]


@pytest.mark.timeout(600)
def test_sharded_dino_trains_as_one_process_and_resumes_across_process_counts(tmp_path):
    images = image_folder(tmp_path / "images")
    run_ranks(DINO, tmp_path / "one", images, 16, 1)
    outputs = run_ranks(DINO, tmp_path / "two", images, 8, 2, "train.parallel=fsdp")
    assert "sharded 8 pieces over 2 ranks" in outputs[0]  # 2 blocks, the ViT and the head, of student and teacher
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    a, b = read_checkpoint(tmp_path / "one" / LATEST), read_checkpoint(tmp_path / "two" / LATEST)
    _same_weights(a["objective"], b["objective"])  # whole tensors, in the unsharded layout
    for x, y in zip(_adam_moments(a), _adam_moments(b), strict=True):
        assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-3, atol=1e-4 * float(x.abs().max()))
    _same_weights(torch.load(tmp_path / "one" / "teacher_backbone.pth", weights_only=True),
                  torch.load(tmp_path / "two" / "teacher_backbone.pth", weights_only=True))

    # each checkpoint goes on in the other layout: the unsharded one sharded over 2, the sharded one on 1 process
    run_ranks(DINO, tmp_path / "one", images, 8, 2, "train.parallel=fsdp", "train.max_steps=9")
    run_ranks(DINO, tmp_path / "two", images, 16, 1, "train.max_steps=9")
    a, b = read_checkpoint(tmp_path / "one" / LATEST), read_checkpoint(tmp_path / "two" / LATEST)
    assert a["step"] == b["step"] == 9
    _same_weights(a["objective"], b["objective"])


@pytest.mark.timeout(600)
def test_sharded_dinov2_with_accumulation_matches_ddp(tmp_path):
    images = image_folder(tmp_path / "images")
    accumulate = ["optim.accumulate_steps=2", "train.precision=fp32"]
    run_ranks(DINOV2, tmp_path / "ddp", images, 4, 2, *accumulate)
    run_ranks(DINOV2, tmp_path / "fsdp", images, 4, 2, "train.parallel=fsdp", *accumulate)
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5), step
    _same_weights(read_checkpoint(tmp_path / "ddp" / LATEST)["objective"],
                  read_checkpoint(tmp_path / "fsdp" / LATEST)["objective"])


@pytest.mark.timeout(600)
def test_sharded_bf16_gathers_bf16_and_keeps_fp32_weights(tmp_path):
    images = image_folder(tmp_path / "images")
    run_ranks(DINOV2, tmp_path / "ddp", images, 8, 2, "train.precision=bf16")
    run_ranks(DINOV2, tmp_path / "fsdp", images, 8, 2, "train.parallel=fsdp", "train.precision=bf16")
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    for step in ddp:  # bf16 weights against bf16 autocast: close, not equal
        assert fsdp[step] == pytest.approx(ddp[step], rel=5e-3), step
    weights = read_checkpoint(tmp_path / "fsdp" / LATEST)["objective"]
    assert all(v.dtype == torch.float32 for k, v in weights.items() if v.is_floating_point())
    _same_weights(read_checkpoint(tmp_path / "ddp" / LATEST)["objective"], weights, rtol=5e-2, atol=5e-3)


def test_shard_units_cover_every_trained_parameter_and_leave_frozen_teachers_whole(tmp_path):
    config = load_train_config(None, DINOV2 + [f"train.output_dir={tmp_path}"])
    objective = build_objective(config)
    units = shard_units(objective)
    assert sum(isinstance(u, Block) for u in units) == 4 and sum(isinstance(u, VisionTransformer) for u in units) == 2
    covered = {id(p) for u in units for p in u.parameters()}
    assert all(id(p) in covered for p in objective.parameters())
    assert all(units.index(b) < units.index(v) for v in units if isinstance(v, VisionTransformer)
               for b in v.modules() if isinstance(b, Block))  # innermost first

    teacher = tmp_path / "teacher.pth"
    torch.save(create_classifier("timm:resnet10t", 10).state_dict(), teacher)
    for student in ("vit_tiny", "timm:resnet10t"):  # a timm student is one piece: none of its parts is a ViT
        deit = load_train_config(None, ["objective.name=deit", f"model.backbone={student}", "objective.num_classes=10",
                                        "objective.distillation_type=hard", "objective.teacher.name=timm:resnet10t",
                                        f"objective.teacher.weights={teacher}"])
        objective = build_objective(deit)
        units = shard_units(objective)
        covered = {id(p) for u in units for p in u.parameters()}
        assert all(id(p) in covered for p in objective.student.parameters())
        assert not {id(p) for p in objective.teacher.parameters()} & covered


def test_fsdp_refuses_fp16_before_anything_runs():
    with pytest.raises(InputError, match="train.precision=bf16"):
        load_train_config(None, ["train.parallel=fsdp", "train.precision=fp16"])
    with pytest.raises(InputError, match="train.parallel"):
        load_train_config(None, ["train.parallel=zero3"])
