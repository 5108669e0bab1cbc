import pytest
import torch

from tests.tiny_dino import UNIT_RUN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_overrides():
    """The overrides of tests/tiny_dino.py's unit run into an output folder, with more of the test's own."""
    def make(output_dir, *extra):
        return UNIT_RUN + [f"train.output_dir={output_dir}", *extra]

    return make


@pytest.fixture
def tiny_config(tiny_overrides):
    """The unit run's validated config (see tiny_overrides)."""
    from distill.engine.train_config import load_train_config

    def make(output_dir, *extra):
        return load_train_config(None, tiny_overrides(output_dir, *extra))

    return make
