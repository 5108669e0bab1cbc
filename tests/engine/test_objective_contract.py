"""The Objective contract is all the trainer knows: an objective it has never heard of, registered from outside the
library, trains, checkpoints, resumes exactly and is evaluated."""

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from distill.data.configs import MultiCropConfig

from distill.data.views import MultiCrop
from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer
from distill.eval.loading import load_backbone
from distill.models import read_checkpoint
from distill.objectives import OBJECTIVES, Objective, ObjectiveConfig, build_backbone, register_objective
from tests.tiny_dino import losses, tiny_model


# The whole objective: a config section, the contract's four required methods, and a registration (below).
@dataclass
class TwoViewsConfig(ObjectiveConfig):
    name: str = "two_views"
    views: MultiCropConfig = field(default_factory=lambda: MultiCropConfig(local_crops_number=0))


class TwoViews(Objective):
    """Pulls the class tokens of two views of an image together (a toy: nothing stops a collapse)."""

    def __init__(self, config: TwoViewsConfig, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.config, self.backbone = config, backbone

    def views(self, channels):
        return MultiCrop(self.config.views, channels)

    def trainable_module(self):
        return self.backbone

    def eval_backbone(self):
        return self.backbone

    def forward(self, batch, info):
        first, second = (self.backbone(crops) for crops in batch["crops"])
        return {"loss": 1 - F.cosine_similarity(first, second.detach()).mean()}


@pytest.fixture
def two_views():
    register_objective("two_views", TwoViewsConfig, lambda config, source=None: TwoViews(
        config.objective, build_backbone(config.model)))
    yield
    del OBJECTIVES["two_views"]


def config(folder, *extra):
    return load_train_config(None, [
        "objective.name=two_views", "model.backbone=vit_tiny", tiny_model(0.0), "data.dataset.kind=fashion_mnist",
        "data.dataset.limit=128", "data.batch_size=16", "data.num_workers=0", "optim.lr=1e-3",
        "optim.warmup_epochs=1", "train.epochs=2", "train.precision=fp32", "train.threads=1",
        "train.log_every_steps=1", "objective.views.global_crops_size=16", "objective.views.mean=[0.286]",
        "objective.views.std=[0.353]", "eval.knn_k=[5]", "eval.val_split=test", "eval.train_limit=128",
        "eval.val_limit=32", "eval.batch_size=64", f"train.output_dir={folder}", *extra])


def test_an_objective_the_trainer_does_not_know_trains_resumes_and_is_evaluated(two_views, tmp_path):
    results = Trainer(config(tmp_path / "once", "train.max_steps=10")).run()
    Trainer(config(tmp_path / "twice", "train.max_steps=5")).run()
    Trainer(config(tmp_path / "twice", "train.max_steps=10")).run()
    once, twice = losses(tmp_path / "once"), losses(tmp_path / "twice")
    assert sorted(once) == sorted(twice) == list(range(1, 11))
    assert all(once[step] == pytest.approx(twice[step], rel=1e-6, abs=1e-6) for step in once)
    weights = [read_checkpoint(tmp_path / run / "checkpoint.pth")["objective"] for run in ("once", "twice")]
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6) for k in weights[0])
    assert not torch.equal(weights[0]["backbone.pos_embed"], build_backbone(config(tmp_path).model).pos_embed)
    assert 0 <= results["knn_end"][5]["top1"] <= 100  # the evaluated backbone, through the objective's own view
    backbone, setup = load_backbone(str(tmp_path / "once" / "checkpoint.pth"))
    assert (setup.image_size, setup.mean, setup.std) == (16, [0.286], [0.353])
    assert torch.equal(backbone.pos_embed, weights[0]["backbone.pos_embed"])
