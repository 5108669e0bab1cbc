"""The teacher's targets in DINO and iBOT: its outputs centred and sharpened (DINO), or Sinkhorn-Knopp assignments
(SwAV; DINOv2's option), and the center kept as a moving average of the teacher's mean output over all ranks."""

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from distill.distributed import all_reduce_sum
from distill.errors import InputError
from distill.losses.kinds import CENTERINGS
from distill.losses.sinkhorn import sinkhorn_knopp


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
        self.target_stats: Dict[str, torch.Tensor] = {}

    def teacher_targets(self, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher [N, K] (fp32, detached) -> target distributions [N, K]; their summary goes to target_stats."""
        if self.centering == "sinkhorn_knopp":
            targets = sinkhorn_knopp(teacher, teacher_temp)
        else:
            targets = F.softmax((teacher - self.center) / teacher_temp, dim=-1)
        self.target_stats = summarise_targets(targets)
        return targets

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


@torch.no_grad()
def summarise_targets(targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What says whether a teacher collapsed, as 0-d tensors (no device sync): "entropy", the mean entropy of the
    target rows over its maximum ln K (1: uniform), and "top_share", the share of rows whose most likely prototype
    is the batch's most common one (1: one prototype for every image)."""
    rows, prototypes = targets.shape
    if rows == 0:
        zero = targets.new_zeros(())
        return {"entropy": zero, "top_share": zero}
    entropy = -(targets * torch.log(targets.clamp_min(1e-30))).sum(dim=-1).mean() / math.log(max(prototypes, 2))
    counts = torch.bincount(targets.argmax(dim=-1), minlength=prototypes)
    return {"entropy": entropy, "top_share": counts.max().float() / rows}
