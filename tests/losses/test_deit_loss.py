"""DeiT's loss against its definitions (Touvron et al. 2021; facebookresearch/deit losses.py), on fixed tensors."""

import math

import pytest
import torch

from distill.errors import InputError
from distill.losses.deit import DistillationLoss, build_base_criterion, hard_distillation, soft_distillation

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
DIST = torch.tensor([[0.3, 1.5, -0.2], [1.0, -2.0, 0.0]])
TEACHER = torch.tensor([[0.0, 4.0, 1.0], [2.0, 0.0, 1.0]])
LABELS = torch.tensor([0, 2])


def _softmax(row, tau=1.0):
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def test_soft_distillation_is_kl_times_tau_squared_over_elements():
    for tau in (1.0, 3.0):
        kl = 0.0
        for student_row, teacher_row in zip(DIST.tolist(), TEACHER.tolist()):
            p_s, p_t = _softmax(student_row, tau), _softmax(teacher_row, tau)
            kl += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t))
        expected = kl * tau * tau / DIST.numel()
        assert soft_distillation(DIST, TEACHER, tau).item() == pytest.approx(expected, rel=1e-5)


def test_hard_distillation_is_cross_entropy_against_the_teacher_argmax():
    # teacher argmax: 1 for the first row, 0 for the second
    expected = -(math.log(_softmax(DIST[0].tolist())[1]) + math.log(_softmax(DIST[1].tolist())[0])) / 2
    assert hard_distillation(DIST, TEACHER).item() == pytest.approx(expected, rel=1e-5)


def test_alpha_weights_base_and_distillation():
    base = torch.nn.CrossEntropyLoss()
    ce = -(math.log(_softmax(LOGITS[0].tolist())[0]) + math.log(_softmax(LOGITS[1].tolist())[2])) / 2
    for kind, distill in (("hard", hard_distillation(DIST, TEACHER)), ("soft", soft_distillation(DIST, TEACHER, 2.0))):
        out = DistillationLoss(base, kind, alpha=0.3, tau=2.0)((LOGITS, DIST), LABELS, TEACHER)
        assert out["base_loss"].item() == pytest.approx(ce, rel=1e-5)
        assert out["loss"].item() == pytest.approx(0.7 * ce + 0.3 * distill.item(), rel=1e-5)
    none = DistillationLoss(base, "none")((LOGITS, DIST), LABELS)
    assert none["loss"].item() == pytest.approx(ce, rel=1e-5)  # the distillation head is ignored


def test_distillation_without_a_distillation_head_is_a_clear_error():
    with pytest.raises(InputError, match="distilled student"):
        DistillationLoss(torch.nn.CrossEntropyLoss(), "hard")(LOGITS, LABELS, TEACHER)
    with pytest.raises(InputError, match="choose one of"):
        DistillationLoss(torch.nn.CrossEntropyLoss(), "medium")


def test_base_criteria_are_deits_choices():
    log_p = torch.log_softmax(LOGITS, dim=1)
    smoothing = 0.1
    smoothed = build_base_criterion("auto", smoothing, mixup_active=False)(LOGITS, LABELS)
    nll = -log_p[torch.arange(2), LABELS]
    expected = ((1 - smoothing) * nll + smoothing * (-log_p.mean(dim=1))).mean()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)
    soft_targets = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    mixed = build_base_criterion("auto", smoothing, mixup_active=True)(LOGITS, soft_targets)
    assert mixed.item() == pytest.approx((-(soft_targets * log_p).sum(dim=1)).mean().item(), rel=1e-5)
    plain = build_base_criterion("ce", 0.0)(LOGITS, LABELS)
    assert plain.item() == pytest.approx(nll.mean().item(), rel=1e-5)
    bce = build_base_criterion("bce", 0.0, mixup_active=True)(LOGITS, soft_targets)
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(LOGITS, soft_targets)
    assert bce.item() == pytest.approx(expected_bce.item(), rel=1e-5)
