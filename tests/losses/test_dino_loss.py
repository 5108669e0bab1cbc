"""DINO's loss against its definition (Caron et al. 2021; facebookresearch/dino main_dino.py, DINOLoss), on fixed
tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import DINOLoss


def reference(student_out, teacher_out, center, num_crops, student_temp, teacher_temp, momentum):
    """Written from the definition, pair by pair, as in the official code."""
    student = (student_out / student_temp).chunk(num_crops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    total, pairs = 0.0, 0
    for t, q in enumerate(teacher):
        for s in range(num_crops):
            if s == t:
                continue
            total = total + torch.sum(-q * F.log_softmax(student[s], dim=-1), dim=-1).mean()
            pairs += 1
    new_center = momentum * center + (1 - momentum) * teacher_out.mean(dim=0, keepdim=True)
    return total / pairs, new_center, pairs


@pytest.mark.parametrize("local_crops", [0, 2, 8])
def test_loss_and_center_equal_the_definition(local_crops):
    generator = torch.Generator().manual_seed(local_crops)
    batch, dim, crops = 5, 64, 2 + local_crops
    student = torch.randn(crops * batch, dim, generator=generator) * 3
    teacher = torch.randn(2 * batch, dim, generator=generator) * 3
    center = torch.randn(1, dim, generator=generator)
    loss_fn = DINOLoss(dim, num_global=2, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(center)
    expected, expected_center, pairs = reference(student, teacher, center, crops, 0.1, 0.04, 0.9)
    assert pairs == (18 if local_crops == 8 else 2 * crops - 2)
    got = loss_fn(student, teacher, teacher_temp=0.04)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(loss_fn.center, expected_center, atol=1e-6)
    # a second step uses the updated center
    expected2, expected_center2, _ = reference(student, teacher, expected_center, crops, 0.1, 0.07, 0.9)
    assert loss_fn(student, teacher, teacher_temp=0.07).item() == pytest.approx(expected2.item(), rel=1e-5)
    assert torch.allclose(loss_fn.center, expected_center2, atol=1e-6)


def test_hand_computed_two_crops_two_classes():
    # one image, two global crops, K = 2, zero center, both temperatures 1
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # crop 1: p = (3/4, 1/4)
    teacher = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # crop 2: q = (1/4, 3/4)
    loss_fn = DINOLoss(2, student_temp=1.0)
    loss = loss_fn(student, teacher, teacher_temp=1.0)
    # pairs: (t=0, s=1): q=(.5,.5), p=(.75,.25); (t=1, s=0): q=(.25,.75), p=(.5,.5)
    pair_01 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    pair_10 = -(0.25 * math.log(0.5) + 0.75 * math.log(0.5))
    assert loss.item() == pytest.approx((pair_01 + pair_10) / 2, rel=1e-6)
    assert torch.allclose(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))


def test_gradient_flows_to_the_student_only():
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    DINOLoss(16)(student, teacher, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


def test_loss_is_float32_under_bf16_autocast():
    student, teacher = torch.randn(8, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DINOLoss(16)(student, teacher, 0.04)
    expected, _, _ = reference(student.float(), teacher.float(), torch.zeros(1, 16), 4, 0.1, 0.04, 0.9)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
