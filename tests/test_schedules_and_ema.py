"""Schedules and the EMA update against their definitions (DINO's cosine_scheduler and teacher update,
facebookresearch/dino utils.py and main_dino.py)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.ema import ema_update
from distill.errors import InputError
from distill.schedules import cosine_schedule, epochs_to_steps, warmup_then_constant


def test_cosine_schedule_is_dinos_definition():
    base, final, epochs, per_epoch, warmup_epochs = 5e-4, 1e-6, 10, 7, 2
    got = cosine_schedule(base, final, epochs * per_epoch, warmup_epochs * per_epoch)
    warmup = [base * i / (warmup_epochs * per_epoch - 1) for i in range(warmup_epochs * per_epoch)]
    rest = (epochs - warmup_epochs) * per_epoch
    cosine = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)]
    assert len(got) == epochs * per_epoch
    np.testing.assert_allclose(got, warmup + cosine, rtol=1e-12, atol=1e-15)
    assert got[0] == 0.0 and got[warmup_epochs * per_epoch] == pytest.approx(base)


def test_increasing_cosine_for_momentum_and_weight_decay():
    momentum = cosine_schedule(0.996, 1.0, 100)
    assert momentum[0] == pytest.approx(0.996) and np.all(np.diff(momentum) >= 0) and momentum[-1] < 1.0
    assert momentum[-1] == pytest.approx(1.0, abs=1e-5)


def test_teacher_temperature_warmup_and_epoch_lengths():
    temps = warmup_then_constant(0.04, 0.07, 30, 100)
    assert temps[0] == 0.04 and temps[29] == pytest.approx(0.07) and np.all(temps[30:] == 0.07)
    assert epochs_to_steps(1.0, 100.0, 5000) == 50  # an epoch keeps its share of a compressed plan
    with pytest.raises(InputError):
        cosine_schedule(1.0, 0.0, 10, 11)


def test_ema_update_is_the_definition():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    before = {k: v.clone().double() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.996)
    for name, value in teacher.state_dict().items():
        expected = 0.996 * before[name] + 0.004 * student.state_dict()[name].double()
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-7)
    ema_update(teacher, student, 1.0)  # momentum 1 leaves the teacher unchanged
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    assert all(torch.equal(teacher.state_dict()[k], student.state_dict()[k]) for k in before)



def test_stretch_ahead_keeps_the_past_and_fits_the_rest_to_the_new_end():
    from distill.schedules import stretch_ahead

    old = cosine_schedule(1.0, 0.1, 100, warmup_steps=10)
    for total in (40, 100, 250):  # compressed, same, stretched
        new = stretch_ahead(old, 30, total)
        assert len(new) == total and (new[:31] == old[:31]).all() and new[-1] == pytest.approx(old[-1])
        assert (np.diff(new[30:]) <= 1e-12).all()  # what was ahead was a decreasing cosine: it still is
    assert (stretch_ahead(old, 0, 100) == old).all()
    assert len(stretch_ahead(old, 99, 100)) == 100 and stretch_ahead(old, 99, 100)[-1] == old[-1]
