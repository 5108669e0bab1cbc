"""Exponential moving average of the student into the teacher, fused over all parameters."""

from typing import List

import torch
from torch import nn

from distill.distributed import is_sharded, local


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (matched by name)."""
    teacher_params: List[torch.Tensor] = []
    student_params: List[torch.Tensor] = []
    student_named = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        other = student_named[name]
        if is_sharded(param) != is_sharded(other):
            raise RuntimeError(f"EMA of {name}: teacher and student must be sharded alike")
        # sharded networks are cut into the same pieces: each rank averages its own shards
        teacher_params.append(local(param.data))
        student_params.append(local(other.data))
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
