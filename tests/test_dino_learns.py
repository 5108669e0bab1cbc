"""The demo's DINO recipe on Fashion-MNIST, on this CPU, improves kNN over the random initialisation quickly."""

import pytest

from distill.engine.train_config import load_train_config
from distill.engine.trainer import Trainer


@pytest.mark.slow
def test_first_steps_of_the_demo_recipe_beat_random_initialisation(tmp_path):
    # The demo's schedules planned for 2.5 epochs, stopped after its first 900 steps (under 2 minutes here).
    steps = 900
    config = load_train_config("configs/demo/dino_fashion_mnist.yaml", [
        f"train.output_dir={tmp_path}", "train.time_limit_minutes=0", "train.epochs=2.5", f"train.max_steps={steps}",
        "eval.train_limit=10000", "eval.val_limit=2000", "eval.knn_k=[20]", "eval.attention_images=2",
        "eval.raw_pixels=false", "train.seed=1",
    ])
    results = Trainer(config).run()
    start, end = results["knn_start"][20]["top1"], results["knn_end"][20]["top1"]
    assert results["steps"] == steps
    assert end > start + 3.0, (start, end)
    assert (tmp_path / "attention.png").exists() and (tmp_path / "loss_curve.png").exists()
