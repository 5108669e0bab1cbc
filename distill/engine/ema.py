"""Exponential moving average of the student into the teacher, fused over all parameters."""

from typing import List

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (matched by name)."""
    teacher_params: List[torch.Tensor] = []
    student_params: List[torch.Tensor] = []
    student_named = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        teacher_params.append(param.data)
        student_params.append(student_named[name].data)
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
