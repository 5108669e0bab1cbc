"""iBOT's masked-patch loss (Zhou et al. 2022, as used by DINOv2): the student predicts, at each masked patch,
the teacher's distribution over patch prototypes for the unmasked image."""

import torch
import torch.nn.functional as F

from distill.losses.centering import CenteredTeacherLoss


class IBOTPatchLoss(CenteredTeacherLoss):
    """loss = -(1 / n_images) * sum over masked tokens j of w_j * sum_k q_jk log softmax(s_j / tau_s)_k, where q is
    the centred, sharpened teacher (or Sinkhorn-Knopp) distribution at that token and w_j = 1 / (number of masked
    tokens of j's image). n_images counts every global image, masked or not: an image without masked tokens adds
    nothing to the sum but still counts."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center") -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp

    def forward(self, student_masked: torch.Tensor, teacher_masked: torch.Tensor, weights: torch.Tensor,
                n_images: int, teacher_temp: float) -> torch.Tensor:
        """student_masked, teacher_masked: head outputs [M, K] at the M masked tokens; weights [M]."""
        # No early exit for a batch without masked tokens: the collectives of the center update run on every rank.
        with torch.autocast(student_masked.device.type, enabled=False):
            teacher = teacher_masked.detach().float()
            q = self.teacher_targets(teacher, teacher_temp)
            log_p = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
            loss = -(torch.sum(q * log_p, dim=-1) * weights.float()).sum() / n_images
        self.update_center(teacher)
        return loss
