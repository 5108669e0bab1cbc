"""The DINOv2 objective on small models: the loss terms it logs, resuming with masks, the frozen-teacher
distillation recipe, layer-wise learning-rate decay."""

import json

import pytest
import torch

from distill.engine.param_groups import lr_multiplier, param_groups
from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer
from distill.errors import InputError
from distill.models import create_backbone

TINY_DINOV2 = [
    "objective.name=dinov2", "model.backbone=vit_tiny",
    "model.overrides={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 4, img_size: 16, in_chans: 1, "
    "drop_path_rate: 0.1}",
    "data.dataset.kind=fashion_mnist", "data.dataset.limit=128", "data.batch_size=16", "data.num_workers=0",
    "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.layer_decay=0.9", "optim.patch_embed_lr_mult=0.2",
    "train.epochs=2", "train.precision=fp32", "train.log_every_steps=1", "train.threads=1", "eval.knn=false",
    "objective.out_dim=64", "objective.ibot_out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
    "objective.warmup_teacher_temp_epochs=1",
    "objective.views.global_crops_size=16", "objective.views.local_crops_size=8",
    "objective.views.local_crops_number=2", "objective.views.mean=[0.286]", "objective.views.std=[0.353]",
]


def config(folder, *extra):
    return load_train_config(None, TINY_DINOV2 + [f"train.output_dir={folder}", *extra])


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_dinov2_trains_logs_its_terms_and_resumes_exactly(tmp_path):
    Trainer(config(tmp_path / "once", "train.max_steps=8")).run()
    Trainer(config(tmp_path / "twice", "train.max_steps=4")).run()
    Trainer(config(tmp_path / "twice", "train.max_steps=8")).run()
    once = {r["step"]: r for r in rows(tmp_path / "once") if "loss" in r}
    twice = {r["step"]: r for r in rows(tmp_path / "twice") if "loss" in r}
    assert len(once) == 8
    for step, row in once.items():
        assert row["loss"] == pytest.approx(twice[step]["loss"], rel=1e-5, abs=1e-6)
        assert row["masked_share"] == twice[step]["masked_share"]  # the masks too are a function of the step
        expected = row["dino_loss"] + row["ibot_loss"] + 0.1 * row["koleo_loss"]
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert 0 < row["masked_share"] < 0.5  # half the global images, 10-50 % of their tokens
    assert (tmp_path / "once" / "teacher_backbone.pth").is_file()
    exported = torch.load(tmp_path / "once" / "teacher_backbone.pth", weights_only=True)
    model = create_backbone("vit_tiny", depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16, in_chans=1)
    model.load_state_dict(exported)  # the hub layout loads as is


def test_distillation_from_a_frozen_larger_teacher(tmp_path):
    big = ["model.overrides={depth: 3, embed_dim: 48, num_heads: 2, patch_size: 4, img_size: 16, in_chans: 1}"]
    Trainer(config(tmp_path / "teacher", "train.max_steps=2", *big)).run()
    checkpoint = tmp_path / "teacher" / "checkpoint.pth"
    distil = ["objective.distillation.enabled=true", "objective.distillation.teacher_backbone=vit_tiny",
              "objective.distillation.teacher_overrides={depth: 3, embed_dim: 48, num_heads: 2, patch_size: 4, "
              "img_size: 16, in_chans: 1}", f"objective.distillation.teacher_checkpoint={checkpoint}",
              "objective.distillation.student_ema_momentum=0.5"]
    trainer = Trainer(config(tmp_path / "student", "train.max_steps=3", *distil))
    trainer.setup()
    objective = trainer.objective
    saved = torch.load(checkpoint, weights_only=False)["objective"]
    teacher_before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    for key, value in teacher_before.items():  # backbone and heads from the teacher run's teacher
        assert torch.equal(value, saved[f"teacher.{key}"]), key
    trainer.train()
    assert all(torch.equal(v, teacher_before[k]) for k, v in objective.teacher.state_dict().items())
    assert not objective.teacher.training and all(p.grad is None for p in objective.teacher.parameters())
    logged = [r for r in rows(tmp_path / "student") if "loss" in r]
    assert all(r["masked_share"] == 1.0 for r in logged)  # no masking: iBOT on every patch token
    ema, student = objective.student_ema.state_dict(), objective.student.state_dict()
    assert any(not torch.equal(ema[k], student[k]) for k in ema)  # a separate average of the student
    state = torch.load(tmp_path / "student" / "checkpoint.pth", weights_only=False)
    assert state["eval_network"] == "student_ema.backbone."
    assert not any(k.startswith("teacher.") for k in state["objective"])  # the frozen teacher is not stored


def test_distillation_without_a_teacher_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="teacher_checkpoint is not set"):
        Trainer(config(tmp_path, "objective.distillation.enabled=true")).setup()


@pytest.mark.parametrize("ratio", ["[0.5]", "[0.1, 0.3, 0.5]"])
def test_a_mask_ratio_that_is_not_a_pair_is_a_clear_error(tmp_path, ratio):
    with pytest.raises(InputError, match=r"mask_ratio is .*give two numbers \[low, high\]"):
        config(tmp_path, f"objective.mask_ratio={ratio}")


def test_layerwise_decay_and_patch_embedding_multiplier():
    assert lr_multiplier("backbone.blocks.3.attn.qkv.weight", 12, 0.9) == pytest.approx(0.9**9)
    assert lr_multiplier("backbone.pos_embed", 12, 0.9) == pytest.approx(0.9**13)
    assert lr_multiplier("backbone.patch_embed.proj.weight", 12, 0.9, 0.2) == pytest.approx(0.2 * 0.9**13)
    assert lr_multiplier("backbone.norm.weight", 12, 0.9) == 1.0
    assert lr_multiplier("dino_head.mlp.0.weight", 12, 0.9) == 1.0
    model = create_backbone("vit_tiny", depth=2, embed_dim=32, num_heads=2, img_size=32)
    groups = param_groups(model, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): (g["lr_multiplier"], g["apply_wd"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["blocks.0.attn.qkv.weight"])] == (0.25, True)
    assert by_param[id(named["blocks.1.mlp.fc1.bias"])] == (0.5, False)
    assert by_param[id(named["patch_embed.proj.weight"])] == (pytest.approx(0.2 * 0.125), True)
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.parametrize("local_crops", [2, 0])  # 0: the CPU demo's recipe, global crops only
def test_packed_crops_give_the_same_loss_and_gradients(tmp_path, local_crops):
    trainer = Trainer(config(tmp_path, "model.overrides={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 4, "
                                       "img_size: 16, in_chans: 1, drop_path_rate: 0.0}",
                             f"objective.views.local_crops_number={local_crops}"))
    trainer.setup()
    objective = trainer.objective
    batch = next(iter(trainer.loader))
    assert len(batch["crops"]) == 2 + local_crops
    from distill.objectives.base import StepInfo

    info = StepInfo(step=3, total_steps=10, steps_per_epoch=8)
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    results = []
    for packed in (False, True):
        objective.load_state_dict(state)
        objective.config.pack_crops = packed
        objective.zero_grad()
        out = objective(batch, info)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in objective.student.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-5) for n in grads_a)


def test_last_layers_of_both_heads_stay_frozen_for_their_epochs(tmp_path):
    trainer = Trainer(config(tmp_path, "train.max_steps=3", "objective.separate_heads=true",
                             "objective.ibot_out_dim=48", "objective.freeze_last_layer_epochs=1"))
    trainer.setup()
    student = trainer.objective.student
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    after = dict(student.named_parameters())
    for head in ("dino_head", "ibot_head"):
        assert torch.equal(after[f"{head}.last_layer.weight_v"], before[f"{head}.last_layer.weight_v"])
        assert not torch.equal(after[f"{head}.mlp.0.weight"], before[f"{head}.mlp.0.weight"])
