"""Schedules, parameter groups, EMA and LARS against their definitions."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.engine.ema import ema_update
from distill.engine.optim import LARS, set_lr_and_wd
from distill.engine.param_groups import names_without_decay, param_groups
from distill.engine.schedules import cosine_schedule, epochs_to_steps, warmup_then_constant
from distill.errors import InputError
from distill.models import create_backbone
from distill.models.heads import DINOHead


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


def test_no_weight_decay_for_biases_and_one_dimensional_parameters():
    model = create_backbone("vit_tiny", depth=1, layerscale_init=1e-5)
    head = DINOHead(192, out_dim=10, hidden_dim=16, bottleneck_dim=8)
    net = nn.ModuleDict({"backbone": model, "head": head})
    groups = param_groups(net)
    spared = set(names_without_decay(net, groups))
    for name, param in net.named_parameters():
        if not param.requires_grad:
            assert name not in spared and all(param is not p for g in groups for p in g["params"])
        elif name.endswith(".bias") or param.ndim == 1:
            assert name in spared, name
        else:
            assert name not in spared, name
    assert "backbone.blocks.0.ls1.gamma" in spared and "backbone.pos_embed" not in spared  # DINO decays tokens
    timm_style = set(names_without_decay(net, param_groups(net, exclude_tokens=True)))
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.mask_token"} <= timm_style


def test_set_lr_and_wd_applies_decay_only_where_allowed():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(param_groups(model))
    set_lr_and_wd(optimizer, 0.1, 0.05)
    by_decay = {g["apply_wd"]: g for g in optimizer.param_groups}
    assert by_decay[True]["weight_decay"] == 0.05 and by_decay[False]["weight_decay"] == 0.0
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)


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


def test_lars_step_is_the_definition():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    optimizer = LARS([weight, bias], lr=0.1, weight_decay=0.1, momentum=0.9, eta=0.001)
    optimizer.step()
    update = torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # grad + wd * w
    trust = 0.001 * 5.0 / update.norm()
    assert torch.allclose(weight.data, torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    assert torch.allclose(bias.data, torch.tensor([1.0 - 0.1 * 0.5]))  # 1-D: no decay, no adaptation
