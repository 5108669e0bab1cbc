"""What DINO and DINOv2 share at run time (their config: objectives/configs.py SelfDistillationConfig): the
schedules planned from it (teacher temperature warm-up, cosine EMA momentum, frozen last layers), and the watch
for a collapsed teacher."""

import logging
import math
from typing import List, Optional

from torch import nn

from distill import distributed
from distill.objectives.base import StepInfo
from distill.objectives.configs import SelfDistillationConfig
from distill.schedules import cosine_schedule, epochs_to_steps, warmup_then_constant

logger = logging.getLogger(__name__)


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
