"""DINO: self-distillation with no labels (Caron et al. 2021).

Student and teacher share an architecture; the teacher sees the global crops, the student every crop; the
teacher is an exponential moving average of the student; its outputs are centred and sharpened.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

from distill.data.views import MultiCrop, MultiCropConfig
from distill.engine.ema import ema_update
from distill.engine.schedules import cosine_schedule, epochs_to_steps, warmup_then_constant
from distill.errors import InputError
from distill.losses.dino import DINOLoss
from distill.models.heads import DINOHead
from distill.objectives.base import Objective, ObjectiveConfig, StepInfo


@dataclass
class DINOConfig(ObjectiveConfig):
    name: str = "dino"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = 1.0
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    centering: str = "center"  # center (DINO) | sinkhorn_knopp (DINOv2's alternative)
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    views: MultiCropConfig = field(default_factory=MultiCropConfig)

    def validate(self) -> None:
        self.views.validate()
        if self.out_dim < 1 or self.hidden_dim < 1 or self.bottleneck_dim < 1 or self.head_layers < 1:
            raise InputError("objective: out_dim, hidden_dim, bottleneck_dim and head_layers must be positive")
        if not 0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1:
            raise InputError("objective: need 0 <= momentum_teacher <= momentum_teacher_end <= 1")
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
            raise InputError("objective: temperatures must be positive")
        if not 0 <= self.center_momentum < 1:
            raise InputError("objective.center_momentum must lie in [0, 1)")
        if self.centering not in ("center", "sinkhorn_knopp"):
            raise InputError(f"objective.centering {self.centering!r}: choose center or sinkhorn_knopp")


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crop batches; crops of one resolution go through the backbone together."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: List[torch.Tensor]) -> torch.Tensor:
        """crops: list of [B, C, S_i, S_i] -> head outputs [len(crops) * B, K], crop-major."""
        embeddings, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            embeddings.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(embeddings))


class TeacherSchedules:
    """What DINO and DINOv2 plan alike from their configs' fields of the same names: the teacher temperature
    warm-up, the cosine EMA momentum and the steps during which the heads' last layers stay frozen."""

    def plan(self, total_steps: int, steps_per_epoch: int, epochs: float) -> None:
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


class DINOObjective(TeacherSchedules, Objective):
    def __init__(self, config: DINOConfig, student_backbone: nn.Module, teacher_backbone: nn.Module) -> None:
        super().__init__()
        self.config = config
        head = dict(out_dim=config.out_dim, hidden_dim=config.hidden_dim, bottleneck_dim=config.bottleneck_dim,
                    nlayers=config.head_layers, use_bn=config.use_bn_in_head)
        dim = student_backbone.embed_dim
        self.student = MultiCropNetwork(student_backbone, DINOHead(dim, norm_last_layer=config.norm_last_layer, **head))
        self.teacher = MultiCropNetwork(teacher_backbone, DINOHead(dim, **head))
        self.teacher.load_state_dict(self.student.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        self.loss = DINOLoss(config.out_dim, config.views.global_crops_number, config.student_temp,
                             config.center_momentum, config.centering)
        self.plan(1, 1, 1.0)

    def views(self, channels: int) -> MultiCrop:
        return MultiCrop(self.config.views, channels)

    def trainable_module(self) -> nn.Module:
        return self.student

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def scheduled_values(self, step: int) -> Dict[str, float]:
        step = min(step, len(self.momentum_schedule) - 1)
        return {"teacher_temp": float(self.teacher_temp_schedule[step]), "momentum": float(self.momentum_schedule[step])}

    def forward(self, batch: Dict[str, Any], info: StepInfo) -> Dict[str, Any]:
        crops = batch["crops"]
        num_global = self.config.views.global_crops_number
        with torch.no_grad():
            teacher_output = self.teacher(crops[:num_global])
        student_output = self.student(crops)
        temperature = self.scheduled_values(info.step)["teacher_temp"]
        return {"loss": self.loss(student_output, teacher_output, temperature)}

    def before_optimizer_step(self, info: StepInfo) -> None:
        self.freeze_last_layers([self.student.head], info)

    def after_optimizer_step(self, info: StepInfo) -> None:
        ema_update(self.teacher, self.student, self.scheduled_values(info.step)["momentum"])

    def export(self, folder: Path) -> List[Path]:
        """The teacher backbone in the layout of DINO's released backbones (mask token dropped)."""
        state = {k: v.detach().clone() for k, v in self.teacher.backbone.state_dict().items() if k != "mask_token"}
        path = Path(folder) / "teacher_backbone.pth"
        torch.save(state, path)
        return [path]


def build(config, make_backbone, source=None) -> DINOObjective:
    """make_backbone(role) builds the configured backbone; the teacher's has no stochastic depth."""
    return DINOObjective(config.objective, make_backbone("student"), make_backbone("teacher"))
