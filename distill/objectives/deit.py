"""DeiT: supervised training of a ViT, optionally distilled from a frozen teacher (Touvron et al. 2021).

The student is a registered ViT with classifier heads (a distilled one has a distillation token and
head_dist), or any timm / torchvision classifier ("timm:regnety_002"), which is how the teacher recipes train
CNN teachers with this same objective. The teacher never trains: eval mode, no gradients, no_grad (bf16 on a
GPU), left out of checkpoints (it is reloaded from its file); it sees the same mixed images as the student,
re-normalised to its own channels, mean/std and resolution where they differ.
"""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distill.data.augment import match_channels
from distill.data.classification import ClassificationViews
from distill.errors import InputError
from distill.losses.deit import DistillationLoss, build_base_criterion
from distill.models import create_backbone, load_pretrained
from distill.models.classifiers import Classifier, create_classifier
from distill.objectives.base import Objective, StepInfo
from distill.objectives.configs import DeiTConfig
from distill.seeds import derived_seed, seeded_globals

logger = logging.getLogger(__name__)


class Renormalize(nn.Module):
    """Student-normalised images -> the teacher's channels, resolution and mean/std (identity when they agree)."""

    def __init__(self, mean, std, teacher_mean, teacher_std, teacher_chans: int, teacher_size: int) -> None:
        super().__init__()
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)
        self.register_buffer("teacher_mean", torch.tensor(teacher_mean).view(shape), persistent=False)
        self.register_buffer("teacher_std", torch.tensor(teacher_std).view(shape), persistent=False)
        self.teacher_chans, self.teacher_size = teacher_chans, teacher_size
        self.identity = (list(mean) == list(teacher_mean) and list(std) == list(teacher_std)
                         and len(mean) == teacher_chans)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.identity:
            pixels = images * self.std + self.mean
            if pixels.shape[1] != self.teacher_chans:
                pixels = pixels.expand(-1, 3, -1, -1) if self.teacher_chans == 3 else pixels.mean(1, keepdim=True)
            images = (pixels - self.teacher_mean) / self.teacher_std
        if self.teacher_size and images.shape[-1] != self.teacher_size:
            images = F.interpolate(images, size=(self.teacher_size, self.teacher_size), mode="bicubic",
                                   align_corners=False)
        return images


class DeiTObjective(Objective):
    frozen = ("teacher",)  # eval mode, out of checkpoints: rebuilt from its file

    def __init__(self, config: DeiTConfig, student: nn.Module, teacher: Optional[nn.Module], num_classes: int,
                 seed: int = 0) -> None:
        super().__init__()
        self.config, self.num_classes, self.seed = config, num_classes, seed
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for param in teacher.parameters():
                param.requires_grad = False
        self.student_ema = None
        if config.model_ema:
            from timm.utils import ModelEmaV3

            self.student_ema = ModelEmaV3(student, decay=config.model_ema_decay)
        self.mixup = None
        if config.mixup_active:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                               switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                               label_smoothing=config.smoothing, num_classes=num_classes)
        criterion = build_base_criterion(config.criterion, config.smoothing, self.mixup is not None)
        self.loss = DistillationLoss(criterion, config.distillation_type, config.alpha, config.tau)
        self.renormalize: Optional[Renormalize] = None
        if teacher is not None:
            channels, t = student.config["in_chans"], config.teacher
            mean, std = config.views.channel_stats(channels)
            chans = teacher.config["in_chans"]
            teacher_mean, teacher_std = match_channels(mean, std, chans)
            self.renormalize = Renormalize(mean, std, t.mean or teacher_mean, t.std or teacher_std, chans, t.img_size)

    def views(self, channels: int) -> ClassificationViews:
        return ClassificationViews(self.config.views, channels)

    def sampler_repeats(self) -> int:
        return self.config.repeated_aug

    def trainable_module(self) -> nn.Module:
        return self.student

    def eval_backbone(self) -> nn.Module:
        return self.student

    def classifiers(self) -> Dict[str, nn.Module]:
        networks = {"student": self.student}
        if self.student_ema is not None:
            networks["student_ema"] = self.student_ema.module
        if self.teacher is not None:
            networks["teacher"] = nn.Sequential(self.renormalize, self.teacher)
        return networks

    def epoch_classifiers(self) -> Dict[str, nn.Module]:
        """The frozen teacher never changes: evaluated once, at the end."""
        return {name: net for name, net in self.classifiers().items() if name != "teacher"}

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if images.device.type == "cuda" else None
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            return self.teacher(self.renormalize(images)).float()

    def forward(self, batch: Dict[str, Any], info: StepInfo) -> Dict[str, Any]:
        images, labels = batch["crops"][0], batch["labels"]
        if labels is None:
            raise InputError("DeiT trains with labels, but the dataset has none: use an ImageFolder tree, a file "
                             "list with labels, or Fashion-MNIST")
        targets = labels
        if self.mixup is not None:
            if len(images) % 2:
                raise InputError("mixup/cutmix need an even batch size (data.batch_size)")
            with seeded_globals(derived_seed(self.seed, info.step)):  # timm's mixup draws from NumPy's generator
                images, targets = self.mixup(images, labels)
        outputs = self.student(images)
        teacher_logits = self.teacher_logits(images) if self.config.distillation_type != "none" else None
        return self.loss(outputs, targets, teacher_logits)

    def after_optimizer_step(self, info: StepInfo) -> None:
        if self.student_ema is not None:
            self.student_ema.update(self.student, step=info.step)

    def export(self, folder: Path) -> List[Path]:
        """The student in DeiT's release layout ({"model": state dict}); a timm / torchvision student (a teacher
        recipe) as the bare state dict of that library, which the teacher option loads as is."""
        written = []
        networks = {"model": self.student}
        if self.student_ema is not None:
            networks["model_ema"] = self.student_ema.module
        for key, network in networks.items():
            if isinstance(network, Classifier):
                state = {k: v.detach().clone() for k, v in network.net.state_dict().items()}
                path = Path(folder) / ("classifier.pth" if key == "model" else "classifier_ema.pth")
                torch.save(state, path)
                written.append(path)
        if not written:
            state = {k: {n: t.detach().clone() for n, t in net.state_dict().items() if n != "mask_token"}
                     for k, net in networks.items()}
            path = Path(folder) / "model.pth"
            torch.save(state, path)
            written.append(path)
        return written


def build(config, source=None) -> DeiTObjective:

    c, m = config.objective, config.model
    num_classes = c.num_classes or (len(source.classes) if source is not None and source.classes else 0)
    if num_classes < 1:
        raise InputError("objective.num_classes is 0 and the dataset names no classes: set objective.num_classes")
    if source is not None and source.classes and len(source.classes) != num_classes:
        raise InputError(f"objective.num_classes={num_classes} but {source.name} has {len(source.classes)} classes")
    overrides = dict(m.overrides)
    if m.backbone.startswith(("timm:", "torchvision:")):
        student = create_classifier(m.backbone, num_classes, weights=m.pretrained, **overrides)
    else:
        student = create_backbone(m.backbone, num_classes=num_classes, **overrides)
        if m.pretrained:
            load_pretrained(student, m.pretrained, checkpoint_key=m.checkpoint_key, new_heads=c.new_heads)
    teacher = None
    if c.distillation_type != "none":
        t = c.teacher
        if not t.weights:
            raise InputError("objective.teacher.weights is not set: give the teacher's weight file (train one with "
                             "a configs/deit/*teacher*.yaml recipe), or 'hub' to let timm download them")
        chans = t.in_chans or student.config["in_chans"]
        size = t.img_size or c.views.input_size
        teacher = create_classifier(t.name, num_classes, in_chans=chans, img_size=size, weights=t.weights)
    return DeiTObjective(c, student, teacher, num_classes, config.train.seed)
