"""DeiT end to end on small models: frozen teacher, re-normalisation, distilled outputs, resuming, fine-tuning at a
new resolution and on new classes, the repeated-augmentation sampler, and bad input stopped before training."""

import json

import pytest
import torch

from distill.cli import main
from distill.data.loader import EpochBatchSampler
from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer
from distill.errors import CheckpointError, InputError
from distill.models import create_backbone
from distill.models.classifiers import create_classifier
from distill.objectives.deit import Renormalize, build

TINY_DEIT = [
    "objective.name=deit", "model.backbone=vit_tiny",
    "model.overrides={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 7, img_size: 28, in_chans: 1, "
    "distilled: true, drop_path_rate: 0.1}",
    "data.dataset.kind=fashion_mnist", "data.dataset.limit=128", "data.batch_size=16", "data.num_workers=0",
    "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.weight_decay=0.05", "optim.weight_decay_end=0.05",
    "train.epochs=2", "train.precision=fp32", "train.log_every_steps=1", "train.threads=1",
    "eval.knn=false", "eval.val_split=test", "eval.val_limit=64",
    "objective.views.input_size=28", "objective.views.mean=[0.286]", "objective.views.std=[0.353]",
    "objective.repeated_aug=0",
]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A small timm CNN for Fashion-MNIST (random weights), saved in timm's bare state-dict layout."""
    torch.manual_seed(0)
    teacher = create_classifier("timm:test_resnet", num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp("teacher") / "test_resnet.pth"
    torch.save(teacher.net.state_dict(), path)
    return path


def deit_config(folder, *extra):
    return load_train_config(None, TINY_DEIT + [f"train.output_dir={folder}", *extra])


def distilled(teacher_file, kind="hard"):
    return [f"objective.distillation_type={kind}", "objective.teacher.name=test_resnet",
            f"objective.teacher.weights={teacher_file}"]


def test_the_teacher_never_changes_and_gets_no_gradients(teacher_file, tmp_path):
    trainer = Trainer(deit_config(tmp_path, "train.max_steps=6", *distilled(teacher_file)))
    trainer.setup()
    teacher = trainer.objective.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert trainer.step == 6 and all(torch.isfinite(torch.tensor(trainer.losses)))
    assert not teacher.training  # the trainer puts the objective in train mode; the teacher stays in eval mode
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    file_state = torch.load(teacher_file, weights_only=True)
    assert all(torch.equal(file_state[k], v) for k, v in teacher.net.state_dict().items())
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["objective"]
    assert not any(k.startswith("teacher.") for k in saved)  # reloaded from its file, never stored twice
    student_params = {id(p) for p in trainer.objective.trainable_module().parameters()}
    assert not any(id(p) in student_params for p in teacher.parameters())


def test_a_distilled_student_returns_both_heads_in_training_and_their_mean_in_evaluation():
    model = create_backbone("deit_tiny_distilled_patch16_224", img_size=32, num_classes=5, depth=2)
    images = torch.randn(3, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    cls_logits, dist_logits = model(images)
    assert cls_logits.shape == dist_logits.shape == (3, 5) and not torch.allclose(cls_logits, dist_logits)
    model.eval()
    with torch.no_grad():
        features = model.forward_features(images)
        expected = (model.head(features["x_norm_clstoken"]) + model.head_dist(features["x_norm_disttoken"])) / 2
        assert torch.allclose(model(images), expected, atol=1e-6)


def test_renormalisation_for_a_teacher_with_other_statistics_channels_and_size():
    student_mean, student_std = [0.286], [0.353]
    teacher_mean, teacher_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    renorm = Renormalize(student_mean, student_std, teacher_mean, teacher_std, teacher_chans=3, teacher_size=0)
    pixels = torch.rand(2, 1, 8, 8)
    student_view = (pixels - 0.286) / 0.353
    out = renorm(student_view)
    assert out.shape == (2, 3, 8, 8)
    for c in range(3):
        expected = (pixels[:, 0] - teacher_mean[c]) / teacher_std[c]
        assert torch.allclose(out[:, c], expected, atol=1e-5)
    resized = Renormalize(student_mean, student_std, student_mean, student_std, 1, teacher_size=16)(student_view)
    assert resized.shape == (2, 1, 16, 16)
    same = Renormalize(student_mean, student_std, student_mean, student_std, 1, 0)
    assert same.identity and same(student_view) is student_view


def test_the_teacher_sees_renormalised_images(teacher_file, tmp_path):
    config = deit_config(tmp_path, *distilled(teacher_file), "objective.teacher.mean=[0.5]",
                         "objective.teacher.std=[0.25]", "objective.teacher.img_size=32", "objective.num_classes=10")
    objective = build(config)
    seen = []
    objective.teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(2, 1, 28, 28)
    objective.teacher_logits((images - 0.286) / 0.353)
    expected = torch.nn.functional.interpolate((images - 0.5) / 0.25, size=(32, 32), mode="bicubic",
                                               align_corners=False)
    assert seen[0].shape == (2, 1, 32, 32) and torch.allclose(seen[0], expected, atol=1e-5)


def test_resume_gives_the_uninterrupted_run_with_mixup_and_randaugment(teacher_file, tmp_path):
    extra = (*distilled(teacher_file, "soft"), "train.checkpoint_every_minutes=0", "objective.model_ema=true",
             "objective.model_ema_decay=0.9")
    Trainer(deit_config(tmp_path / "once", "train.max_steps=10", *extra)).run()
    Trainer(deit_config(tmp_path / "twice", "train.max_steps=5", *extra)).run()
    Trainer(deit_config(tmp_path / "twice", "train.max_steps=10", *extra)).run()
    rows = lambda folder: [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda folder: {r["step"]: r["loss"] for r in rows(folder) if "loss" in r}  # noqa: E731
    once, twice = losses(tmp_path / "once"), losses(tmp_path / "twice")
    assert len(once) == 10 and once == twice
    results = json.loads((tmp_path / "once" / "results.json").read_text())
    assert set(results["val"]) == {"student", "student_ema", "teacher"}
    ema = lambda folder: torch.load(folder / "checkpoint.pth", weights_only=False)["objective"]  # noqa: E731
    once_ema, twice_ema = ema(tmp_path / "once"), ema(tmp_path / "twice")
    ema_keys = [k for k in once_ema if k.startswith("student_ema.")]
    assert ema_keys and all(torch.allclose(once_ema[k], twice_ema[k], atol=1e-6) for k in ema_keys)
    assert not torch.equal(once_ema["student_ema.module.head.weight"], once_ema["student.head.weight"])
    assert 0 <= results["val"]["student"]["top1"] <= results["val"]["student"]["top5"] <= 100
    epoch_rows = [r for r in rows(tmp_path / "once") if "student_val_top1" in r]
    assert [r["epoch"] for r in epoch_rows] == [1]  # 8 steps an epoch: one full epoch within 10 steps
    # the run's checkpoint evaluates like any other (the student's backbone, at its input size)
    code = main(["eval", "knn", "--checkpoint", str(tmp_path / "once" / "checkpoint.pth"), "--data", "fashion_mnist",
                 "--train-limit", "64", "--val-limit", "32", "--val-split", "test", "--num-workers", "0", "--k", "5",
                 "--output", str(tmp_path / "knn.json")])
    assert code in (0, None) and (tmp_path / "knn.json").is_file()


def test_a_224_checkpoint_fine_tunes_at_384_with_both_heads(tmp_path):
    small = dict(depth=1, embed_dim=192, num_heads=3)
    source = create_backbone("deit_base_distilled_patch16_224", num_classes=10, **small)
    path = tmp_path / "deit_224.pth"
    torch.save({"model": source.state_dict()}, path)
    config = load_train_config(None, [
        "objective.name=deit", "model.backbone=deit_base_distilled_patch16_384", f"model.pretrained={path}",
        "model.overrides={depth: 1, embed_dim: 192, num_heads: 3}", "objective.num_classes=10", "objective.views.input_size=384",
        "objective.mixup=0", "objective.cutmix=0"])
    objective = build(config)
    student = objective.student
    assert student.pos_embed.shape == (1, 2 + 24 * 24, 192)
    assert torch.equal(student.head.weight, source.head.weight)
    assert torch.equal(student.head_dist.weight, source.head_dist.weight)
    assert torch.equal(student.pos_embed[:, :2], source.pos_embed[:, :2])  # class and distillation positions
    images, labels = torch.randn(2, 3, 384, 384), torch.tensor([1, 7])
    out = objective({"crops": [images], "labels": labels}, None)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and student.pos_embed.grad is not None


def test_transfer_from_a_dino_backbone_makes_new_heads_and_a_distillation_token(tmp_path):
    dino = create_backbone("dino_vits16", depth=1)
    path = tmp_path / "dino_backbone.pth"
    torch.save(dino.state_dict(), path)
    config = load_train_config(None, [
        "objective.name=deit", "model.backbone=deit_small_distilled_patch16_224", f"model.pretrained={path}",
        "model.overrides={depth: 1}", "objective.num_classes=7", "objective.new_heads=true"])
    student = build(config).student
    assert student.head.weight.shape == (7, 384) and student.head_dist.weight.shape == (7, 384)
    assert torch.equal(student.blocks[0].attn.qkv.weight, dino.blocks[0].attn.qkv.weight)
    assert torch.equal(student.dist_token, dino.cls_token)


def test_repeated_augmentation_deals_each_image_to_every_rank():
    ranks = [EpochBatchSampler(1024, 64, seed=3, rank=r, world_size=3, repeats=3) for r in range(3)]
    lists = [sampler.epoch_indices(5).tolist() for sampler in ranks]
    assert all(len(x) == 1024 // 3 for x in lists)  # timm's RASampler: as many samples as without repeats
    # Position i on every rank holds the same image: its three copies, one augmented on each rank.
    assert lists[0] == lists[1] == lists[2]
    single = EpochBatchSampler(1024, 64, seed=3, repeats=3).epoch_indices(5).tolist()
    assert len(single) == 1024 and single[0] == single[1] == single[2] and len(set(single)) == 342
    assert EpochBatchSampler(1024, 64, seed=4, repeats=3).epoch_indices(5).tolist() != single  # the run's seed


@pytest.mark.parametrize("problem, match", [
    ("classes", "classify 5 classes but the dataset has 10"),
    ("missing", "does not exist"),
    ("name", "not a model timm or torchvision knows"),
])
def test_bad_teachers_fail_before_training(problem, match, teacher_file, tmp_path, capsys):
    args = list(distilled(teacher_file))
    if problem == "classes":
        five = tmp_path / "five.pth"
        torch.save(create_classifier("test_resnet", num_classes=5, in_chans=1).net.state_dict(), five)
        args[2] = f"objective.teacher.weights={five}"
    elif problem == "missing":
        args[2] = f"objective.teacher.weights={tmp_path / 'nowhere.pth'}"
    else:
        args[1] = "objective.teacher.name=regnety_16gf_typo"
    run = tmp_path / "run"
    code = main(["train", *TINY_DEIT, f"train.output_dir={run}", *args])
    err = capsys.readouterr().err
    assert code != 0 and match in err
    assert not (run / "checkpoint.pth").exists() and not (run / "metrics.jsonl").exists()


def test_no_teacher_weights_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="teacher.weights is not set"):
        build(deit_config(tmp_path, "objective.distillation_type=hard", "objective.num_classes=10"))
    with pytest.raises(CheckpointError, match="does not exist"):
        create_classifier("test_resnet", 10, weights=str(tmp_path / "missing.pth"))
