import pytest

from distill.engine.train_config import load_train_config

TINY = [
    "model.backbone=vit_tiny",
    "model.overrides={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 4, img_size: 16, in_chans: 1, "
    "drop_path_rate: 0.1}",
    "data.dataset.kind=fashion_mnist", "data.dataset.limit=256", "data.batch_size=16", "data.num_workers=0",
    "optim.lr=1e-3", "optim.warmup_epochs=1", "train.epochs=4", "train.precision=fp32", "train.log_every_steps=1",
    "train.threads=1", "eval.knn=false",
    "objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
    "objective.views.global_crops_size=16", "objective.views.local_crops_size=8",
    "objective.views.local_crops_number=2", "objective.views.mean=[0.286]", "objective.views.std=[0.353]",
]


@pytest.fixture
def tiny_overrides():
    """A DINO run small enough for a unit test: 16 steps per epoch of 256 Fashion-MNIST images."""
    def make(output_dir, *extra):
        return TINY + [f"train.output_dir={output_dir}", *extra]

    return make


@pytest.fixture
def tiny_config(tiny_overrides):
    def make(output_dir, *extra):
        return load_train_config(None, tiny_overrides(output_dir, *extra))

    return make
