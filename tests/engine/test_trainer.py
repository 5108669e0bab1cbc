"""The trainer: resume equality (also after a real kill), atomic saves, non-finite losses, bad input."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from distill.cli import main
from distill.engine.checkpointing import LATEST, save_atomic
from distill.engine.trainer import Trainer, TrainingDiverged
from distill.errors import CheckpointError, InputError
from distill.models import read_checkpoint
from tests.tiny_dino import losses


def _weights(folder):
    return read_checkpoint(folder / LATEST)["objective"]


def _assert_same_run(a, b):
    losses_a, losses_b = losses(a), losses(b)
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, 13))
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], rel=1e-6, abs=1e-6), step
    weights_a, weights_b = _weights(a), _weights(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.allclose(weights_a[key], weights_b[key], rtol=1e-5, atol=1e-6), key


def test_resume_continues_exactly(tiny_config, tmp_path):
    Trainer(tiny_config(tmp_path / "once", "train.max_steps=12")).run()
    Trainer(tiny_config(tmp_path / "twice", "train.max_steps=6")).run()
    assert read_checkpoint(tmp_path / "twice" / LATEST)["step"] == 6
    Trainer(tiny_config(tmp_path / "twice", "train.max_steps=12")).run()  # resume=auto finds the checkpoint
    _assert_same_run(tmp_path / "once", tmp_path / "twice")
    # the teacher moved away from the student, and both from their start
    weights = _weights(tmp_path / "once")
    assert not torch.equal(weights["teacher.backbone.pos_embed"], weights["student.backbone.pos_embed"])


def test_resume_after_a_real_kill(tiny_config, tiny_overrides, tmp_path):
    Trainer(tiny_config(tmp_path / "once", "train.max_steps=12")).run()
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "distill.cli", "train",
               *tiny_overrides(killed, "train.max_steps=12", "train.checkpoint_every_minutes=0")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / LATEST).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # land the kill anywhere: in a step, in a save
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / LATEST).exists()
    interrupted_at = read_checkpoint(killed / LATEST)["step"]
    Trainer(tiny_config(killed, "train.max_steps=12")).run()
    _assert_same_run(tmp_path / "once", killed)
    assert interrupted_at <= 12


_SAVER = """
import sys, torch
from distill.engine.checkpointing import save_atomic
i = 0
while True:
    i += 1
    save_atomic({"version": i, "weights": torch.full((2_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    process = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few complete saves happen, then kill during the next ones
        process.stdout.readline()
    time.sleep(random.uniform(0.0, 0.1))
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_checkpoint(path)
    assert state["version"] >= 3 and torch.all(state["weights"] == state["version"])


def test_a_failing_save_keeps_the_old_file_and_no_leftovers(tmp_path, monkeypatch):
    path = save_atomic({"version": 1}, tmp_path / "checkpoint.pth")

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"version": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def _inject_nan_at(trainer, step):
    forward = trainer.objective.forward

    def poisoned(batch, info):
        if info.step == step:
            batch["crops"][0][0, 0, 0, 0] = float("nan")
            trainer.saved_before_nan = (trainer.output_dir / LATEST).read_bytes()
        return forward(batch, info)

    trainer.objective.forward = poisoned


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.checkpoint_every_minutes=0", "train.max_steps=8"))
    trainer.setup()
    _inject_nan_at(trainer, 4)
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 5 .*last good checkpoint .* untouched"):
        trainer.run()
    assert (tmp_path / LATEST).read_bytes() == trainer.saved_before_nan
    assert read_checkpoint(tmp_path / LATEST)["step"] == 4


def test_nan_policy_skip_skips_the_step_and_training_goes_on(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.nan_policy=skip", "train.max_steps=8",
                                  "train.checkpoint_every_minutes=0"))
    trainer.setup()
    _inject_nan_at(trainer, 4)
    results = trainer.run()
    assert results["skipped_steps"] == 1 and results["steps"] == 8
    state = read_checkpoint(tmp_path / LATEST)["objective"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())  # center included


def test_bad_config_and_bad_data_fail_before_training(tmp_path, capsys, tiny_overrides):
    assert main(["train", "configs/demo/dino_fashion_mnist.yaml", "objective.out_dimm=5"]) == 2
    assert "unknown config key 'objective.out_dimm'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", *tiny_overrides(tmp_path / "run", "data.dataset.kind=folder",
                                          f"data.dataset.path={tmp_path / 'empty'}")]) == 2
    assert "no image files" in capsys.readouterr().err
    assert not (tmp_path / "run" / LATEST).exists()
    with pytest.raises(InputError, match="one optimizer step needs 512 images"):
        Trainer(load_cfg(tiny_overrides, tmp_path / "big", "data.batch_size=512")).setup()


def load_cfg(tiny_overrides, folder, *extra):
    from distill.engine.train_config import load_train_config

    return load_train_config(None, tiny_overrides(folder, *extra))


def test_corrupt_files_are_skipped_and_listed(tmp_path, tiny_overrides):
    import numpy as np
    from PIL import Image

    for i in range(40):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    run = tmp_path / "run"
    results = Trainer(load_cfg(tiny_overrides, run, "data.dataset.kind=folder", f"data.dataset.path={tmp_path}",
                               "train.max_steps=2")).run()
    assert results["steps"] == 2
    from distill.data.filelists import read_paths

    assert read_paths(run / "unreadable_images.txt") == [str(tmp_path / "bad.png")]


@pytest.fixture
def sigterm_restored():
    """The SIGTERM handler of the test process as it was, whatever the test did to it and however it ended."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_signal_checkpoints_and_stops(tiny_config, tmp_path, sigterm_restored):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=12"))
    trainer.setup()
    forward = trainer.objective.forward

    def signalled(batch, info):
        if info.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(batch, info)

    trainer.objective.forward = signalled
    results = trainer.run()
    assert results["steps"] == 6 and read_checkpoint(tmp_path / LATEST)["step"] == 6


def test_a_fresh_run_never_overwrites_an_existing_checkpoint(tiny_config, tmp_path):
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).run()
    before = (tmp_path / LATEST).read_bytes()
    with pytest.raises(InputError, match="already holds a checkpoint .* train.resume=auto"):
        Trainer(tiny_config(tmp_path, "train.max_steps=4", "train.resume=never")).run()
    assert (tmp_path / LATEST).read_bytes() == before


def test_a_trainer_set_up_without_run_lets_the_folder_go_when_closed(tiny_config, tmp_path):
    from tests.test_files import _other_process_may_hold

    with Trainer(tiny_config(tmp_path, "train.max_steps=3")) as trainer:
        trainer.setup()
        assert trainer.save_checkpoint() is not None
        assert not _other_process_may_hold(tmp_path)  # held while set up, as during run()
    assert _other_process_may_hold(tmp_path)
    trainer.close()  # a second close is harmless


def test_non_finite_tensors_names_each_broken_float_tensor_of_a_nested_state_in_order():
    from distill.engine.checkpointing import non_finite_tensors

    state = {"student": {"w": torch.ones(3), "b": torch.tensor([1.0, float("nan")])},
             "steps": torch.tensor([7]),  # integers cannot hold NaN
             "groups": [{"exp_avg": torch.tensor([float("-inf")])}, {"exp_avg": torch.zeros(2, dtype=torch.float16)}],
             "teacher": torch.tensor(float("inf"), dtype=torch.bfloat16), "lr": 0.1}
    assert non_finite_tensors(state) == ["student.b", "groups.0.exp_avg", "teacher"]
    assert non_finite_tensors({"w": torch.ones(2)}) == [] and non_finite_tensors({}) == []


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_stays_finite(tiny_config, tmp_path, precision):
    trainer = Trainer(tiny_config(tmp_path, f"train.precision={precision}", "train.max_steps=3"))
    results = trainer.run()
    assert results["steps"] == 3 and (trainer.scaler is not None) == (precision == "fp16")
    state = read_checkpoint(tmp_path / LATEST)
    assert all(torch.isfinite(v).all() for v in state["objective"].values() if v.is_floating_point())
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_gradient_accumulation_steps_over_several_batches(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "optim.accumulate_steps=2", "train.max_steps=3"))
    results = trainer.run()
    assert trainer.steps_per_epoch == 8 and trainer.global_batch == 32 and results["steps"] == 3
    # the learning rate scales with the accumulated batch: 1e-3 * 32 / 256 at the end of warm-up
    assert trainer.scaled_lr() == pytest.approx(1e-3 * 32 / 256)


def test_time_budget_is_fitted_again_to_the_recent_pace(tiny_config, tmp_path):
    """The first fit sees slow early steps; later fits follow the faster pace, never past the configured epochs."""
    trainer = Trainer(tiny_config(tmp_path, "train.time_limit_minutes=1", "train.epochs=100"))
    trainer.setup()
    assert trainer.configured_steps == trainer.total_steps == 1600

    def run_for(steps, seconds_per_step):
        for _ in range(steps):
            trainer.step += 1
            trainer.train_seconds += seconds_per_step
            trainer.budget.record(seconds_per_step)
            trainer.fit_budget()

    run_for(10, 0.5)  # probe: 5 s spent at 0.5 s/step, 55 s left -> 110 more steps
    assert trainer.total_steps == 120 and trainer.budget.fits == 1
    run_for(10, 0.001)  # past 5% of the budget: this fast a pace would pass the configured 100 epochs, which cap it
    assert trainer.budget.fits == 2 and trainer.total_steps == trainer.configured_steps
    assert len(trainer.lr_schedule) == trainer.total_steps
    run_for(10, 0.5)  # past 15%: slower again, the plan shrinks to 30 + 49.99 / 0.5 steps
    assert trainer.budget.fits == 3 and abs(trainer.total_steps - 129) <= 1
    run_for(20, 0.5)  # past 30% at step 46 (18.01 s): 46 + 41.99 / 0.5 steps
    assert trainer.budget.fits == 4 and abs(trainer.total_steps - 129) <= 1
    run_for(40, 0.5)  # past 60% at step 82 (36.01 s): 82 + 23.99 / 0.5 steps
    assert trainer.budget.fits == 5 and abs(trainer.total_steps - 129) <= 1
    run_for(22, 0.5)  # past 85% at step 112 (51.01 s): the same pace, the same plan
    assert trainer.budget.fits == 6 and abs(trainer.total_steps - 129) <= 1
    run_for(10, 0.6)  # slower late in the run: past 95% at step 122 (57.01 s), 122 + 2.99 / 0.6 steps; the plan of
    assert trainer.budget.fits == 7 and trainer.total_steps == 126  # 129 would have been cut short by the clock
    planned = trainer.total_steps
    run_for(20, 0.01)  # no fits after the last share
    assert trainer.budget.fits == 7 and trainer.total_steps == planned


def _schedules(trainer):
    objective = trainer.objective
    return {"lr": trainer.lr_schedule, "wd": trainer.wd_schedule, "teacher_temp": objective.teacher_temp_schedule,
            "momentum": objective.momentum_schedule}


def test_budget_refits_change_only_what_is_ahead_and_resume_rebuilds_the_same_curves(tiny_config, tmp_path):
    """Each re-fit keeps every schedule's values so far and goes on from the value it had: the values a budgeted run
    uses have no jump at a re-fit (a re-fit used to re-plan the whole curve: the learning rate jumped back up)."""
    config = tiny_config(tmp_path, "train.time_limit_minutes=1", "train.epochs=100", "optim.warmup_epochs=5",
                         "objective.warmup_teacher_temp_epochs=20", "objective.momentum_teacher=0.9")
    trainer = Trainer(config)
    trainer.setup()
    used = {name: [] for name in _schedules(trainer)}
    largest_change = dict.fromkeys(used, 0.0)  # the largest change between neighbouring steps within one plan
    refits = []
    for seconds in [0.5] * 10 + [0.05] * 10 + [0.5] * 20 + [0.2] * 30 + [0.5] * 40:
        before = {name: schedule.copy() for name, schedule in _schedules(trainer).items()}
        for name, schedule in before.items():
            used[name].append(float(schedule[trainer.step]))
            largest_change[name] = max(largest_change[name], float(abs(schedule[1:] - schedule[:-1]).max()))
        trainer.step += 1
        trainer.train_seconds += seconds
        trainer.budget.record(seconds)
        total = trainer.total_steps
        trainer.fit_budget()
        if trainer.total_steps != total:
            refits.append(trainer.step)
            for name, schedule in _schedules(trainer).items():
                assert len(schedule) == trainer.total_steps
                # the past and the present kept, to the last bit
                assert (schedule[: trainer.step + 1] == before[name][: trainer.step + 1]).all(), (name, trainer.step)
                assert schedule[-1] == pytest.approx(before[name][-1]), name  # still ending where it ended
        if trainer.step >= trainer.total_steps:
            break
    assert len(refits) >= 3, refits  # shorter and longer plans, in the warm-ups and after them
    for name, values in used.items():
        steps = [abs(b - a) for a, b in zip(values, values[1:])]
        assert max(steps) <= largest_change[name] * (1 + 1e-9), name
    assert trainer.plan_history[0] == (0, trainer.configured_steps) and len(trainer.plan_history) == len(refits) + 1

    trainer.save_checkpoint()
    resumed = Trainer(tiny_config(tmp_path, "train.time_limit_minutes=1", "train.epochs=100", "optim.warmup_epochs=5",
                                  "objective.warmup_teacher_temp_epochs=20", "objective.momentum_teacher=0.9"))
    resumed.setup()
    assert resumed.step == trainer.step and resumed.plan_history == trainer.plan_history
    for name, schedule in _schedules(resumed).items():
        assert (schedule == _schedules(trainer)[name]).all(), name


# ------------------------------------------------------------------------------- refusals leave the folder as it was

def test_a_refused_run_touches_nothing_in_the_folder(tiny_config, tmp_path, caplog):
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).run()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    dinov2 = tiny_config(tmp_path, "train.max_steps=4", "eval.knn_at_start=true")
    dinov2.objective = __import__("distill.objectives.dinov2", fromlist=["DINOv2Config"]).DINOv2Config(
        out_dim=64, ibot_out_dim=64, hidden_dim=32, bottleneck_dim=16, views=dinov2.objective.views)
    with caplog.at_level(logging.INFO, logger="distill"):
        with pytest.raises(CheckpointError, match=r"written by a dino / vit_tiny \(embed_dim 32, depth 2, patch_size "
                                                  r"4\) run and this is a dinov2 / vit_tiny"):
            Trainer(dinov2).run()
    assert not [r for r in caplog.records if "kNN" in r.getMessage()]  # refused before any evaluation
    with pytest.raises(InputError, match="already holds a checkpoint"):
        Trainer(tiny_config(tmp_path, "train.resume=never", "train.epochs=9")).run()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_resume_with_other_settings_says_which_and_keeps_the_earlier_recipe(tiny_overrides, tmp_path, caplog):
    import yaml

    run = tmp_path / "run"
    Trainer(load_cfg(tiny_overrides, run, "train.max_steps=2")).run()
    with caplog.at_level(logging.WARNING, logger="distill"):
        Trainer(load_cfg(tiny_overrides, run, "train.max_steps=3", "optim.lr=0.5", "data.num_workers=1")).run()
    said = [r.getMessage() for r in caplog.records if "settings that differ" in r.getMessage()]
    assert len(said) == 1 and "optim.lr 0.001 there, 0.5 here" in said[0] and "num_workers" not in said[0]
    assert yaml.safe_load((run / "config_until_step_2.yaml").read_text())["optim"]["lr"] == 0.001
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.5


def test_a_finished_run_run_again_keeps_its_results_and_a_resume_keeps_what_its_start_measured(
        tiny_overrides, tmp_path, caplog):
    run = tmp_path / "run"
    plan = ("train.epochs=2", "eval.knn_at_start=true", "eval.knn=true", "eval.train_limit=200",
            "eval.val_limit=100")
    first = Trainer(load_cfg(tiny_overrides, run, *plan, "train.max_steps=20")).run()
    assert first["status"] == "stopped" and "knn_start" in first
    second = Trainer(load_cfg(tiny_overrides, run, *plan)).run()  # resumed to the end of its 2 epochs
    as_json = lambda results: json.loads(json.dumps(results))  # noqa: E731  (the file's keys are strings)
    assert second["status"] == "finished" and "knn_end" in second
    assert as_json(second["knn_start"]) == as_json(first["knn_start"])
    before = (run / "results.json").read_bytes()
    with caplog.at_level(logging.INFO, logger="distill"):
        third = Trainer(load_cfg(tiny_overrides, run, *plan)).run()
    assert third == as_json(second) and (run / "results.json").read_bytes() == before
    assert any("already finished at step" in r.getMessage() for r in caplog.records)


def test_more_neighbours_than_images_are_refused_before_the_run_folder_is_made(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"eval.knn_k \[100\] asks for more neighbours than the 50 images"):
        Trainer(load_cfg(tiny_overrides, run, "eval.knn=true", "eval.train_limit=50", "eval.knn_k=[100]")).run()
    assert not run.exists()


def test_a_bare_distill_train_asks_for_a_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    assert "give a recipe, e.g. configs/demo/dino_fashion_mnist.yaml" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_spent_time_budget_stops_unless_only_the_plan_s_last_percent_is_left(tiny_config, tmp_path):
    with Trainer(tiny_config(tmp_path, "train.time_limit_minutes=0.01", "train.epochs=20")) as trainer:
        trainer.setup()
        trainer.total_steps, trainer.train_seconds = 320, 0.6  # 0.01 min = 0.6 s: spent
        for step, spent in ((0, True), (316, True), (317, False), (319, False)):  # 1% of 320: 3 steps
            trainer.step = step
            assert trainer._budget_spent() is spent, step
        trainer.step = 0
        trainer.train()  # as a resume whose budget went before: no step, and why
        assert trainer.step == 0 and "spent before this resume (raise train.time_limit_minutes" in trainer.stop_reason


def test_knn_on_unlabelled_images_is_refused_before_the_run_folder_is_made(tiny_overrides, tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(np.full((20, 20), 15 * i, np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    config = load_cfg(tiny_overrides, run, "data.dataset.kind=folder", f"data.dataset.path={folder}",
                      "eval.knn=false", "eval.knn_at_start=true", "train.max_steps=2")
    with pytest.raises(InputError, match="eval.knn=false, eval.knn_at_start=false, eval.knn_every_epochs=0"):
        Trainer(config).run()
    assert not run.exists()


@pytest.mark.parametrize("key, value, expected", [
    ("embed_dim", 48, ["shape mismatches", "blocks.*.attn.qkv.weight file [96, 32] vs model [144, 48]",
                       "written by a dino / vit_tiny (embed_dim 32, depth 2, patch_size 4) run",
                       "model.overrides.embed_dim 32 there, 48 here"]),
    ("mlp_ratio", 2.0, ["Both are dino / vit_tiny (embed_dim 32, depth 2, patch_size 4) runs",  # the same recipe
                        "what differs: model.overrides.mlp_ratio unset there, 2.0 here"]),
])
def test_a_checkpoint_of_another_shape_is_refused_naming_keys_recipe_and_settings(tiny_config, tmp_path, key, value,
                                                                                  expected):
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).run()
    other = tiny_config(tmp_path, "train.max_steps=4")
    other.model.overrides[key] = value
    with pytest.raises(CheckpointError) as refused:
        Trainer(other).run()
    message = str(refused.value)
    assert "\n" not in message and [part for part in expected if part not in message] == []


# ------------------------------------------------------------------------------- metrics and results after a stop

def test_a_resume_trims_metrics_past_its_checkpoint_and_a_torn_line(tiny_config, tmp_path):
    Trainer(tiny_config(tmp_path, "train.max_steps=6")).run()
    metrics = tmp_path / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    # what a kill -9 after the checkpoint of step 6 leaves: two more rows and half of a third
    extra = [dict(rows[-1], step=7), dict(rows[-1], step=8)]
    metrics.write_text(metrics.read_text() + "".join(json.dumps(r) + "\n" for r in extra) + '{"step": 9, "lo')
    Trainer(tiny_config(tmp_path, "train.max_steps=10")).run()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 11))  # each step once, nothing torn
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 10


def test_a_torn_metrics_line_during_a_run_does_not_break_its_checkpoints(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3"))
    trainer.setup()
    trainer.metrics.path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert trainer.save_checkpoint() is not None and (tmp_path / "loss_curve.png").exists() is False


def test_disk_full_during_a_save_is_one_line_in_the_terminal_and_the_log(tiny_overrides, tmp_path, monkeypatch,
                                                                          capsys):
    import errno

    from distill.engine import checkpointing

    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(run, "train.max_steps=16")]) == 0  # one epoch: checkpoint of step 16
    save = checkpointing.save_atomic

    def full_disk(state, path):
        if state["step"] > 17:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(state, path)

    monkeypatch.setattr(checkpointing, "save_atomic", full_disk)
    capsys.readouterr()
    assert main(["train", *tiny_overrides(run, "train.max_steps=20")]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "dino:" not in line]
    assert len(said) == 1 and "No space left on device" in said[0] and "previous one is intact" in said[0]
    assert "No space left on device" in (run / "train.log").read_text()
    assert read_checkpoint(run / LATEST)["step"] == 16


@pytest.mark.parametrize("workers, stop", [(0, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGINT)])
def test_a_signal_stop_says_so_in_results_and_in_the_exit_status(tiny_overrides, tmp_path, workers, stop):
    """SIGTERM as scancel, timeout and container runtimes send it, and Ctrl-C's SIGINT as a terminal does: to every
    process of the job, loader workers included; the workers keep serving while the step ends and the checkpoint
    is written."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "distill.cli", "train", *tiny_overrides(run, "train.max_steps=2000",
                                                                            "train.epochs=200",
                                                                            f"data.num_workers={workers}",
                                                                            "eval.knn=true", "eval.train_limit=500")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file()
                                          and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.killpg(process.pid, stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop
    assert f"stopped early by signal {stop.name}" in err and "run the same command to resume" in err
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "stopped" and results["stop_reason"] == f"signal {stop.name}"
    assert results["steps"] == read_checkpoint(run / LATEST)["step"] < 2000
    # a stopped job may have seconds left (a preemption's grace): the evaluation waits for the resume
    assert results["evaluation"].startswith("skipped: stopped by a signal") and "knn_end" not in results


def test_fp16_on_a_cpu_is_warned_about(tiny_config, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="distill"):
        Trainer(tiny_config(tmp_path, "train.precision=fp16", "train.max_steps=1")).setup()
    assert any("fp16 on a CPU" in r.getMessage() for r in caplog.records)


def test_threads_follow_the_cores_the_process_may_use(tmp_path, monkeypatch):
    from distill.engine import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # 4 cores, whatever this machine has
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    monkeypatch.setattr(runtime, "CGROUP_ROOT", tmp_path)
    cores, how = runtime.available_cores()
    assert cores == 2 and "cgroup quota of 1.5 CPUs" in how
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU
    assert runtime.available_cores()[0] == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.available_cores() == (4, f"4 cores in the affinity mask of {os.cpu_count()}")


def test_names_that_are_not_utf8_train_and_are_listed_byte_for_byte(tmp_path, tiny_overrides):
    import numpy as np
    from PIL import Image

    from distill.data.filelists import read_paths

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        name = os.fsdecode(f"caf\xe9-{i}.png".encode("latin-1"))  # not UTF-8: as os.listdir returns it
        Image.fromarray(np.full((20, 20), i, np.uint8)).save(os.path.join(os.fsencode(folder), os.fsencode(name)),
                                                             format="PNG")
    bad = os.path.join(os.fsencode(folder), b"broken-\xff.png")
    with open(bad, "wb") as handle:
        handle.write(b"not an image")
    run = tmp_path / "run"
    results = Trainer(load_cfg(tiny_overrides, run, "data.dataset.kind=folder", f"data.dataset.path={folder}",
                               "train.max_steps=2")).run()
    assert results["steps"] == 2
    assert [os.fsencode(p) for p in read_paths(run / "unreadable_images.txt")] == [bad]


def test_weights_that_turned_non_finite_are_never_saved_over_a_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3"))
    trainer.setup()
    assert trainer.save_checkpoint() is not None
    before = (tmp_path / LATEST).read_bytes()
    parameter = next(trainer.objective.parameters())
    with torch.no_grad():
        parameter.view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN or inf at step 0 \(.+\), so they were not saved: .*last finite"):
        trainer.save_checkpoint()
    assert (tmp_path / LATEST).read_bytes() == before


@pytest.mark.parametrize("override, words", [
    ("optim.lr=inf", "'optim.lr' is inf"), ("train.epochs=nan", "'train.epochs' is nan"),
    ("optim.weight_decay=nan", "'optim.weight_decay' is nan"), ("train.threads=-1", "'train.threads' must be >= 0"),
    ("train.checkpoint_every_minutes=-1", "'train.checkpoint_every_minutes' must be >= 0"),
    ("eval.knn_k=[10,0]", "'eval.knn_k' is [10, 0]"), ("data.dataset.limit=-1", "limit must be >= 0"),
    ("model.overrides.patch_size=0", "patch_size=0 for vit_tiny: give a whole number of at least 1"),
    ("model.overrides.embed_dim=abc", "embed_dim='abc' for vit_tiny: give a whole number"),
    ("model.overrides.num_heads=3", "not a multiple of num_heads 3"),
    ("optim.betas=[0.9]", "'optim.betas' is [0.9]: give two numbers in [0, 1)"),
    ("optim.min_lr=1", "optim.min_lr (1.0) exceeds optim.lr"), ("optim.momentum=2", "'optim.momentum' must lie in"),
    ("eval.knn_temperature=0", "'eval.knn_temperature' must be positive"),
    ("eval.batch_size=0", "'eval.batch_size' must be positive"), ("eval.image_size=-1", "'eval.image_size' must be"),
    ("objective.views.hue=5", "views.hue must lie in [0, 0.5]"), ("train.resume=maybe", "give auto (the run"),
    ("model.checkpoint_key=teacher", "model.pretrained, which is not set"),
    ("objective.koleo_loss_weight=0.3", "objective.koleo_loss_weight belongs to the dinov2 objective, and this "
                                        "recipe trains dino: set objective.name=dinov2"),
    ("=3", "overrides must look like key=value, got =3"),
    ("eval.dataset=/nowhere", "'eval.dataset' in the command line is a section of keys, not a value: set one of "
                              "them, e.g. eval.dataset.path=/nowhere"),
])
def test_numbers_that_cannot_train_are_refused_before_the_run(override, words, tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides(tmp_path / "run", override)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("distill train: error:") and words in last, last
    assert not (tmp_path / "run" / LATEST).exists()


def test_yes_and_no_of_yaml_are_the_verify_settings(tiny_config, tmp_path):
    assert tiny_config(tmp_path, "data.dataset.verify=no").data.dataset.verify == "no"
    assert tiny_config(tmp_path, "data.dataset.verify=yes").data.dataset.verify == "yes"


def test_a_second_run_into_a_folder_in_use_is_refused_and_changes_nothing(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, "train.max_steps=2000", "train.epochs=200")
    first = subprocess.Popen([sys.executable, "-m", "distill.cli", "train", *overrides], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.05)
        config = (run / "config.yaml").read_text()
        assert main(["train", *overrides]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "another process is writing into train.output_dir" in last, last
        assert (run / "config.yaml").read_text() == config
    finally:
        first.kill()
        first.wait()
    assert main(["train", *tiny_overrides(run, "train.max_steps=17", "train.epochs=200")]) == 0  # the lock died with it
    assert not (tmp_path / "refused").exists()
    assert main(["train", *tiny_overrides(tmp_path / "refused", "train.resume=nowhere.pth")]) == 2
    assert not (tmp_path / "refused").exists()  # a refused run leaves no folder it made


def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(tiny_overrides, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    for folder, words in ((tmp_path / "afile", "is a file, not a folder"),
                          (tmp_path / "afile" / "sub", f"cannot hold it: {tmp_path / 'afile'} is a file")):
        assert main(["train", *tiny_overrides(folder)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("distill train: error: train.output_dir") and words in last, last
    assert (tmp_path / "afile").read_text() == "mine"


def test_max_steps_counts_the_steps_of_the_run_in_all_across_resumes(tiny_config, tmp_path):
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).run()
    again = Trainer(tiny_config(tmp_path, "train.max_steps=2"))
    results = again.run()
    assert again.step == 2 and results["steps"] == 2 and read_checkpoint(tmp_path / LATEST)["step"] == 2
    Trainer(tiny_config(tmp_path, "train.max_steps=5")).run()
    assert read_checkpoint(tmp_path / LATEST)["step"] == 5


def test_a_resume_with_other_epochs_keeps_its_plan_and_says_so(tiny_config, tmp_path, caplog):
    first = Trainer(tiny_config(tmp_path, "train.max_steps=3"))
    first.run()
    planned = first.total_steps
    with caplog.at_level(logging.WARNING, logger="distill"):
        again = Trainer(tiny_config(tmp_path, "train.max_steps=5", f"train.epochs={first.config.train.epochs * 2}"))
        results = again.run()
    assert again.total_steps == planned and results["steps"] == 5
    assert any("a resume keeps the plan" in r.getMessage() for r in caplog.records)
    assert f"epochs: {first.config.train.epochs}" in (tmp_path / "config.yaml").read_text()
    assert results["images_per_second"] > 0  # the pace of this process's two steps


def test_ctrl_c_is_the_python_default_again_once_training_ends(tiny_config, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).run()
    assert signal.getsignal(signal.SIGINT) is before  # a notebook or caller gets its KeyboardInterrupt back
