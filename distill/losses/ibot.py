"""iBOT's masked-patch loss (Zhou et al. 2022, as used by DINOv2): the student predicts, at each masked patch,
the teacher's distribution over patch prototypes for the unmasked image."""

import torch
import torch.nn.functional as F
from torch import nn

from distill.engine import distributed
from distill.losses.sinkhorn import sinkhorn_knopp

CENTERINGS = ("center", "sinkhorn_knopp")


class IBOTPatchLoss(nn.Module):
    """loss = -(1 / n_images) * sum over masked tokens j of w_j * sum_k q_jk log softmax(s_j / tau_s)_k, where q is
    the centred, sharpened teacher (or Sinkhorn-Knopp) distribution at that token and w_j = 1 / (number of masked
    tokens of j's image). n_images counts every global image, masked or not: an image without masked tokens adds
    nothing to the sum but still counts."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering {centering!r}: choose one of {', '.join(CENTERINGS)}")
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_masked: torch.Tensor, teacher_masked: torch.Tensor, weights: torch.Tensor,
                n_images: int, teacher_temp: float) -> torch.Tensor:
        """student_masked, teacher_masked: head outputs [M, K] at the M masked tokens; weights [M]."""
        # No early exit for a batch without masked tokens: the collectives below must run on every rank.
        with torch.autocast(student_masked.device.type, enabled=False):
            teacher = teacher_masked.detach().float()
            if self.centering == "sinkhorn_knopp":
                q = sinkhorn_knopp(teacher, teacher_temp)
            else:
                q = F.softmax((teacher - self.center) / teacher_temp, dim=-1)
            log_p = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
            loss = -(torch.sum(q * log_p, dim=-1) * weights.float()).sum() / n_images
        if self.centering == "center":
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_masked: torch.Tensor) -> None:
        total = distributed.all_reduce_sum(teacher_masked.sum(dim=0, keepdim=True))
        count = distributed.all_reduce_sum(torch.tensor([teacher_masked.shape[0]], dtype=total.dtype,
                                                        device=total.device))
        if count.item() == 0 or not torch.isfinite(total).all():  # nothing masked anywhere, or a broken batch
            return
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
