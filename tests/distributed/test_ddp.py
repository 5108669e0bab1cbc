"""Two gloo processes give the run one process gives with the same global batch: DINO's losses, its center
(reduced over ranks) and every weight of student and teacher."""

import pytest
import torch

from distill.engine.checkpointing import LATEST
from distill.models import read_checkpoint
from tests.distributed.ranks import image_folder, run_ranks
from tests.tiny_dino import TINY_DINO, losses, tiny_model

TINY = TINY_DINO + [
    tiny_model(0.0), "optim.lr=1e-3", "optim.warmup_epochs=0", "train.epochs=2", "train.max_steps=6",
    "objective.views.mean=[0.286]", "objective.views.std=[0.353]",
]


def _run(output, images, batch, world, *extra):
    return run_ranks(TINY, output, images, batch, world, *extra)


@pytest.mark.timeout(600)
def test_two_gloo_processes_train_as_one_process_with_the_same_global_batch(tmp_path):
    images = image_folder(tmp_path / "images")
    _run(tmp_path / "one", images, batch=16, world=1)
    outputs = _run(tmp_path / "two", images, batch=8, world=2)
    assert "run folder" in outputs[0] and "run folder" not in outputs[1]  # rank 0 reports, once
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    a, b = read_checkpoint(tmp_path / "one" / LATEST), read_checkpoint(tmp_path / "two" / LATEST)
    assert a["step"] == b["step"] == 6
    for key, value in a["objective"].items():
        assert torch.allclose(value, b["objective"][key], rtol=1e-4, atol=1e-5), key
    moved = read_checkpoint(tmp_path / "one" / LATEST)["objective"]
    assert moved["loss.center"].abs().sum() > 0  # the center was updated (from both ranks' teacher outputs)

    # the 2-process checkpoint resumes on 1 process (same global batch) and goes on as the 1-process run does
    _run(tmp_path / "one", images, 16, 1, "train.max_steps=9")
    _run(tmp_path / "two", images, 16, 1, "train.max_steps=9")
    a, b = read_checkpoint(tmp_path / "one" / LATEST), read_checkpoint(tmp_path / "two" / LATEST)
    assert a["step"] == b["step"] == 9
    for key, value in a["objective"].items():
        assert torch.allclose(value, b["objective"][key], rtol=1e-4, atol=1e-5), key


@pytest.mark.timeout(600)
def test_a_two_process_run_resumes_exactly_with_each_rank_s_random_state(tmp_path):
    images = image_folder(tmp_path / "images")
    noisy = tiny_model(0.2)  # stochastic depth draws from each rank's own generator
    _run(tmp_path / "once", images, 8, 2, noisy)
    _run(tmp_path / "twice", images, 8, 2, noisy, "train.max_steps=3")
    _run(tmp_path / "twice", images, 8, 2, noisy)
    one, two = losses(tmp_path / "once"), losses(tmp_path / "twice")
    for step in range(1, 7):
        assert two[step] == pytest.approx(one[step], rel=1e-6, abs=1e-6), step
    a, b = read_checkpoint(tmp_path / "once" / LATEST), read_checkpoint(tmp_path / "twice" / LATEST)
    assert isinstance(a["rng"], list) and len(a["rng"]) == 2
    for key, value in a["objective"].items():
        assert torch.allclose(value, b["objective"][key], rtol=1e-5, atol=1e-6), key
