import pytest

from distill.engine.train_config import load_train_config
from tests.tiny_dino import TINY_DINO, tiny_model

TINY = TINY_DINO + [
    tiny_model(0.1), "data.dataset.kind=fashion_mnist", "data.dataset.limit=256", "data.batch_size=16",
    "optim.lr=1e-3", "optim.warmup_epochs=1", "train.epochs=4", "objective.views.mean=[0.286]",
    "objective.views.std=[0.353]",
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
