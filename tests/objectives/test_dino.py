"""The DINO objective on a tiny run: the teacher without stochastic depth, the heads' last layer frozen for its
epochs, and the export in the layout of DINO's released backbones."""

import torch

from distill.engine.checkpointing import LATEST
from distill.engine.trainer import Trainer
from distill.eval.loading import load_backbone
from distill.models import create_backbone


def _drop_rates(backbone):
    return [block.drop_prob for block in backbone.blocks]


def test_the_teacher_is_built_without_stochastic_depth(tiny_config, tmp_path):
    """As in DINO's main_dino.py, drop_path_rate is the student's only (the unit run asks for 0.1)."""
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1"))
    trainer.setup()
    assert max(_drop_rates(trainer.objective.student.backbone)) > 0
    assert _drop_rates(trainer.objective.teacher.backbone) == [0.0, 0.0]


def test_export_is_the_official_dino_layout(tiny_config, tmp_path):
    Trainer(tiny_config(tmp_path, "train.max_steps=3")).run()
    exported = torch.load(tmp_path / "teacher_backbone.pth", weights_only=True)
    assert "mask_token" not in exported and "pos_embed" in exported and "blocks.0.attn.qkv.weight" in exported
    dims = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16, in_chans=1)
    official_like = create_backbone("dino_vits16", pretrained=str(tmp_path / "teacher_backbone.pth"), **dims).eval()
    teacher, _ = load_backbone(str(tmp_path / LATEST))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(official_like(x), teacher(x))


def test_dino_last_layer_stays_frozen_for_its_epochs_then_trains(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=20", "objective.freeze_last_layer_epochs=1"))
    trainer.setup()
    head = trainer.objective.student.head
    start = head.last_layer.weight_v.detach().clone()
    trainer.config.train.max_steps = 16  # one epoch of 16 steps: frozen throughout
    trainer.train()
    assert torch.equal(head.last_layer.weight_v, start) and trainer.step == 16
    trainer.config.train.max_steps, trainer.stop_reason = 20, None
    trainer.train()  # resumes from the epoch-end checkpoint; the freeze is over
    assert not torch.equal(head.last_layer.weight_v, start)


def test_a_collapsed_teacher_is_reported_once_with_its_likely_causes(tiny_config, tmp_path, caplog):
    """A teacher far too warm gives uniform targets: the loss sits at ln K and nothing is learned."""
    import json
    import logging

    with caplog.at_level(logging.WARNING, logger="distill"):
        Trainer(tiny_config(tmp_path / "hot", "train.max_steps=24", "objective.teacher_temp=100",
                            "objective.warmup_teacher_temp=100")).run()
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "uniform over its 64 prototypes" in warnings[0] and "optim.lr" in warnings[0]
    rows = [json.loads(line) for line in (tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_entropy"] > 0.99 for r in rows if "loss" in r)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill"):
        Trainer(tiny_config(tmp_path / "fine", "train.max_steps=24")).run()
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()]


def test_collapse_watch_needs_its_patience_and_sees_one_prototype_for_all():
    from distill.objectives.self_distillation import CollapseWatch

    watch = CollapseWatch(prototypes=10, patience=3)
    assert watch.update(0, 0.995, 0.1) is None and watch.update(1, 0.5, 0.2) is None  # a healthy step resets
    assert [watch.update(step, 0.2, 0.97) for step in (2, 3)] == [None, None]
    message = watch.update(4, 0.2, 0.97)
    assert "since step 3" in message and "one prototype for 97% of the images" in message
    assert watch.update(5, 0.2, 0.97) is None  # once
