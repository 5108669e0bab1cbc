"""DINO's cross-entropy between a centred, sharpened teacher and the student (Caron et al. 2021)."""

import torch
import torch.nn.functional as F

from distill.losses.centering import CenteredTeacherLoss


class DINOLoss(CenteredTeacherLoss):
    """loss = mean over (teacher view t, student view s != t) of
    mean_batch( -sum_k softmax((teacher_t - center) / tau_t)_k * log_softmax(student_s / tau_s)_k ).

    The center is then updated with the mean teacher output over the global batch (all ranks):
    center <- m * center + (1 - m) * mean. With centering="sinkhorn_knopp" the teacher targets are
    Sinkhorn-Knopp assignments instead (DINOv2's option) and the center is left alone.
    """

    def __init__(self, out_dim: int, num_global: int = 2, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center"):
        super().__init__(out_dim, center_momentum, centering)
        self.num_global = num_global
        self.student_temp = student_temp

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """student_output [num_crops * B, K] (crop-major), teacher_output [num_global * B, K]."""
        num_crops = student_output.shape[0] * self.num_global // teacher_output.shape[0]
        batch = teacher_output.shape[0] // self.num_global
        with torch.autocast(student_output.device.type, enabled=False):  # the loss itself always in fp32
            log_p = F.log_softmax(student_output.float() / self.student_temp, dim=-1).view(num_crops, batch, -1)
            teacher = teacher_output.detach().float()
            q = self.teacher_targets(teacher, teacher_temp).view(self.num_global, batch, -1)
            # cross[t, s] = mean_b sum_k q[t, b, k] * log_p[s, b, k]: one contraction for all pairs
            cross = torch.einsum("tbk,sbk->ts", q, log_p) / batch
        same_view = torch.diagonal(cross[:, : self.num_global]).sum()
        pairs = self.num_global * num_crops - min(self.num_global, num_crops)
        loss = -(cross.sum() - same_view) / pairs
        self.update_center(teacher)
        return loss
