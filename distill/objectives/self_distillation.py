"""What DINO and DINOv2 share: the config of an EMA teacher with projection heads over multi-crop views, and the
schedules planned from it (teacher temperature warm-up, cosine EMA momentum, frozen last layers)."""

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from distill import distributed
from distill.data.views import MultiCropConfig
from distill.errors import InputError
from distill.losses.centering import CENTERINGS
from distill.objectives.base import ObjectiveConfig, StepInfo
from distill.schedules import cosine_schedule, epochs_to_steps, warmup_then_constant

logger = logging.getLogger(__name__)


@dataclass
class SelfDistillationConfig(ObjectiveConfig):
    """Fields of DINO's defaults (Caron et al. 2021, facebookresearch/dino main_dino.py); DINOv2 changes some."""

    out_dim: int = 65536  # prototypes of the (DINO) head
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    centering: str = "center"  # center (DINO) | sinkhorn_knopp (DINOv2's alternative)
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    views: MultiCropConfig = field(default_factory=MultiCropConfig)

    def validate(self) -> None:
        self.views.validate()
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers) < 1:
            raise InputError("objective: out_dim, hidden_dim, bottleneck_dim and head_layers must be positive")
        if not 0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1:
            raise InputError("objective: need 0 <= momentum_teacher <= momentum_teacher_end <= 1")
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
            raise InputError("objective: temperatures must be positive")
        if not 0 <= self.center_momentum < 1:
            raise InputError("objective.center_momentum must lie in [0, 1)")
        if self.centering not in CENTERINGS:
            raise InputError(f"objective.centering {self.centering!r}: choose one of {', '.join(CENTERINGS)}")


class TeacherSchedules:
    """Mixed into the objectives of a SelfDistillationConfig: their schedules, one value per optimizer step."""

    config: SelfDistillationConfig

    def plan(self, total_steps: int, epochs: float) -> None:
        c = self.config
        self.teacher_temp_schedule = warmup_then_constant(
            c.warmup_teacher_temp, c.teacher_temp, epochs_to_steps(c.warmup_teacher_temp_epochs, epochs, total_steps),
            total_steps)
        self.momentum_schedule = cosine_schedule(c.momentum_teacher, c.momentum_teacher_end, total_steps)
        self.freeze_last_layer_steps = epochs_to_steps(c.freeze_last_layer_epochs, epochs, total_steps)

    def freeze_last_layers(self, heads: List[nn.Module], info: StepInfo) -> None:
        """Drop the gradients of the heads' last layers early on: the prototypes stay put while the rest settles."""
        if info.step < self.freeze_last_layer_steps:
            for head in heads:
                for param in head.last_layer.parameters():
                    param.grad = None


class CollapseWatch:
    """Warns once (rank 0) when the teacher's targets look collapsed for `patience` optimizer steps in a row:
    uniform (mean entropy above `uniform` of its maximum: the loss then sits at ln K and nothing is learned), or
    one prototype for nearly every image (the most common argmax for more than `one_prototype` of the rows)."""

    def __init__(self, prototypes: int, patience: int = 20, uniform: float = 0.99, one_prototype: float = 0.95):
        self.prototypes, self.patience = prototypes, patience
        self.uniform, self.one_prototype = uniform, one_prototype
        self.since: Optional[int] = None
        self.warned = False

    def update(self, step: int, entropy: float, top_share: float) -> Optional[str]:
        """Feed one step's target statistics; returns the warning when it is given (once)."""
        collapsed = entropy > self.uniform or top_share > self.one_prototype
        if not collapsed:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if self.warned or step - self.since + 1 < self.patience:
            return None
        self.warned = True
        if entropy > self.uniform:
            what = (f"uniform over its {self.prototypes} prototypes (entropy {100 * entropy:.1f}% of the maximum; the "
                    f"loss sits near ln {self.prototypes} = {math.log(self.prototypes):.2f})")
        else:
            what = f"one prototype for {100 * top_share:.0f}% of the images"
        message = (f"the teacher looks collapsed since step {self.since + 1}: its targets are {what}. Training goes "
                   "on, but the features stop improving. Likely causes: a learning rate too high for the batch "
                   "(optim.lr), too little warm-up (optim.warmup_epochs), a teacher temperature too high "
                   "(objective.teacher_temp) or an EMA momentum too low (objective.momentum_teacher); resume from an "
                   "earlier kept checkpoint (train.save_every_epochs) with a lower optim.lr")
        if distributed.is_main_process():
            logger.warning(message)
        return message
