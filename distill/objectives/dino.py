"""DINO: self-distillation with no labels (Caron et al. 2021).

Student and teacher share an architecture; the teacher sees the global crops, the student every crop; the
teacher is an exponential moving average of the student; its outputs are centred and sharpened.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from distill.data.views import MultiCrop
from distill.losses.dino import DINOLoss
from distill.models.heads import DINOHead
from distill.objectives.base import Objective, StepInfo, build_backbone
from distill.objectives.configs import DINOConfig
from distill.objectives.self_distillation import CollapseWatch, PretrainedHeads, TeacherSchedules, pretrained_heads


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


class DINOObjective(TeacherSchedules, Objective):
    def __init__(self, config: DINOConfig, student_backbone: nn.Module, teacher_backbone: nn.Module,
                 heads: Optional[PretrainedHeads] = None) -> None:
        """heads: the projection head of model.pretrained, restored into the student (and so the teacher)."""
        super().__init__()
        self.config = config
        head = dict(out_dim=config.out_dim, hidden_dim=config.hidden_dim, bottleneck_dim=config.bottleneck_dim,
                    nlayers=config.head_layers, use_bn=config.use_bn_in_head)
        dim = student_backbone.embed_dim
        self.student = MultiCropNetwork(student_backbone, DINOHead(dim, norm_last_layer=config.norm_last_layer, **head))
        self.teacher = MultiCropNetwork(teacher_backbone, DINOHead(dim, **head))
        if heads is not None:
            heads.restore(self.student, ["head"])
        self.teacher.load_state_dict(self.student.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        self.loss = DINOLoss(config.out_dim, config.views.global_crops_number, config.student_temp,
                             config.center_momentum, config.centering)
        self.collapse = CollapseWatch(config.out_dim)
        self.plan(1, 1.0)

    def views(self, channels: int) -> MultiCrop:
        return MultiCrop(self.config.views, channels)

    def trainable_module(self) -> nn.Module:
        return self.student

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def scheduled_values(self, step: int) -> Dict[str, float]:
        step = min(step, len(self.momentum_schedule) - 1)
        return {"teacher_temp": float(self.teacher_temp_schedule[step]),
                "momentum": float(self.momentum_schedule[step])}

    def forward(self, batch: Dict[str, Any], info: StepInfo) -> Dict[str, Any]:
        crops = batch["crops"]
        num_global = self.config.views.global_crops_number
        with torch.no_grad():
            teacher_output = self.teacher(crops[:num_global])
        student_output = self.student(crops)
        temperature = self.scheduled_values(info.step)["teacher_temp"]
        loss = self.loss(student_output, teacher_output, temperature)
        stats = self.loss.target_stats
        return {"loss": loss, "teacher_entropy": stats["entropy"], "teacher_top_share": stats["top_share"]}

    def before_optimizer_step(self, info: StepInfo) -> None:
        self.freeze_last_layers([self.student.head], info)
        self.freeze_backbone(self.student.backbone, info)

    def after_optimizer_step(self, info: StepInfo) -> None:
        self.update_average(self.teacher, self.student, self.scheduled_values(info.step)["momentum"], info)
        stats = self.loss.target_stats
        self.collapse.update(info.step, float(stats["entropy"]), float(stats["top_share"]))

    def export(self, folder: Path) -> List[Path]:
        """The teacher backbone in the layout of DINO's released backbones (mask token dropped)."""
        state = {k: v.detach().clone() for k, v in self.teacher.backbone.state_dict().items() if k != "mask_token"}
        path = Path(folder) / "teacher_backbone.pth"
        torch.save(state, path)
        return [path]


def build(config, source=None) -> DINOObjective:
    """Student and teacher backbones as config.model says, the teacher's without stochastic depth; the projection
    head of model.pretrained when the file has one (continued pretraining)."""
    return DINOObjective(config.objective, build_backbone(config.model),
                         build_backbone(config.model, stochastic_depth=False),
                         pretrained_heads(config.model, config.objective.restore_heads))
