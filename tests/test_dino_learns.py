"""The demo's recipe (DINOv2 on Fashion-MNIST) and DINO's, on this CPU, improve kNN over the random initialisation
quickly."""

import pytest

from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer

SUBSETS = ["eval.train_limit=10000", "eval.val_limit=2000", "eval.knn_k=[20]", "eval.raw_pixels=false",
           "train.seed=1", "train.time_limit_minutes=0"]


@pytest.mark.slow
def test_first_steps_of_the_demo_recipe_beat_random_initialisation(tmp_path):
    # `make demo`'s recipe planned for 0.8 epochs, stopped after its first 400 steps
    steps = 400
    config = load_train_config("configs/dinov2/dinov2_fashion_mnist.yaml", [
        f"train.output_dir={tmp_path}", "train.epochs=0.8", f"train.max_steps={steps}", "eval.attention_images=2",
        *SUBSETS])
    results = Trainer(config).run()
    start, end = results["knn_start"][20]["top1"], results["knn_end"][20]["top1"]
    assert results["steps"] == steps
    assert end > start + 5.0, (start, end)
    assert (tmp_path / "attention.png").exists() and (tmp_path / "loss_curve.png").exists()


@pytest.mark.slow
def test_first_steps_of_the_dino_recipe_beat_random_initialisation(tmp_path):
    # The DINO recipe's schedules planned for 2.5 epochs at batch 32, stopped after its first 900 steps
    steps = 900
    config = load_train_config("configs/demo/dino_fashion_mnist.yaml", [
        f"train.output_dir={tmp_path}", "train.epochs=2.5", f"train.max_steps={steps}", "data.batch_size=32",
        "eval.attention_images=0",
        *SUBSETS])
    results = Trainer(config).run()
    start, end = results["knn_start"][20]["top1"], results["knn_end"][20]["top1"]
    assert results["steps"] == steps
    assert end > start + 3.0, (start, end)
