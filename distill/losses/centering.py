"""The teacher's targets in DINO and iBOT: its outputs centred and sharpened (DINO), or Sinkhorn-Knopp assignments
(SwAV; DINOv2's option), and the center kept as a moving average of the teacher's mean output over all ranks."""

import torch
import torch.nn.functional as F
from torch import nn

from distill.distributed import all_reduce_sum
from distill.errors import InputError
from distill.losses.sinkhorn import sinkhorn_knopp

CENTERINGS = ("center", "sinkhorn_knopp")


class CenteredTeacherLoss(nn.Module):
    """Base of the losses that compare the student with a centred teacher. Holds the center, a [1, K] buffer
    (state-dict key `center`), updated by center <- m * center + (1 - m) * mean of the teacher rows of the step
    over all ranks; left alone with centering="sinkhorn_knopp"."""

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "center") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise InputError(f"centering {centering!r}: choose one of {', '.join(CENTERINGS)}")
        self.center_momentum, self.centering = center_momentum, centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_targets(self, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher [N, K] (fp32, detached) -> target distributions [N, K]."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher, teacher_temp)
        return F.softmax((teacher - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """Fold the step's teacher rows [N, K] into the center. Every rank calls it (the sums are collective), also
        with N = 0; a step with no rows anywhere, or a non-finite one (a broken batch must not poison the center
        for good), leaves it as it was."""
        if self.centering != "center":
            return
        total = all_reduce_sum(teacher.sum(dim=0, keepdim=True))
        count = all_reduce_sum(torch.tensor([teacher.shape[0]], dtype=total.dtype, device=total.device))
        if count.item() == 0 or not torch.isfinite(total).all():
            return
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
