"""DeiT's loss (Touvron et al. 2021): a base criterion on the class head plus distillation on the
distillation head, from a frozen teacher's logits.

    loss = (1 - alpha) * base(class_logits, targets) + alpha * distill(dist_logits, teacher_logits)

soft: KL(softmax(teacher / tau) || softmax(dist / tau)) summed, times tau^2 / number of elements of dist_logits;
hard: cross-entropy of the distillation logits against the teacher's argmax; none: the base criterion alone.
"""

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError
from distill.losses.kinds import CRITERIA, DISTILLATION_TYPES


def build_base_criterion(kind: str = "auto", smoothing: float = 0.1, mixup_active: bool = False) -> nn.Module:
    """DeiT's choice: soft-target cross-entropy under mixup/cutmix, else label smoothing (or plain) cross-entropy;
    "bce" is binary cross-entropy on (mixed, smoothed) one-hot targets (DeiT III)."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if kind not in CRITERIA:
        raise InputError(f"objective.criterion {kind!r}: choose one of {', '.join(CRITERIA)}")
    if kind == "bce":
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else smoothing)  # mixup already smooths
    if mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()


def soft_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    log_student = F.log_softmax(dist_logits / tau, dim=1)
    log_teacher = F.log_softmax(teacher_logits / tau, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
    return kl * (tau * tau) / dist_logits.numel()


def hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


class DistillationLoss(nn.Module):
    def __init__(self, base_criterion: nn.Module, distillation_type: str = "none", alpha: float = 0.5,
                 tau: float = 1.0) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise InputError(f"distillation type {distillation_type!r}: choose one of {', '.join(DISTILLATION_TYPES)}")
        if not 0 <= alpha <= 1 or tau <= 0:
            raise InputError("distillation needs 0 <= alpha <= 1 and tau > 0")
        self.base_criterion, self.distillation_type, self.alpha, self.tau = base_criterion, distillation_type, alpha, tau

    def forward(self, outputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """outputs: class logits, or (class logits, distillation logits) from a distilled model in training mode."""
        dist_logits = None
        if isinstance(outputs, (tuple, list)):
            outputs, dist_logits = outputs
        base = self.base_criterion(outputs.float(), targets)
        if self.distillation_type == "none":
            return {"loss": base, "base_loss": base}
        if dist_logits is None:
            raise InputError("distillation needs a distilled student (a distillation token and head_dist): use a "
                             "deit_*_distilled_* backbone or model.overrides.distilled=true")
        if teacher_logits is None:
            raise InputError("distillation needs the teacher's logits")
        if self.distillation_type == "soft":
            distill = soft_distillation(dist_logits.float(), teacher_logits.float(), self.tau)
        else:
            distill = hard_distillation(dist_logits.float(), teacher_logits.float())
        loss = base * (1 - self.alpha) + distill * self.alpha
        return {"loss": loss, "base_loss": base, "distill_loss": distill}
