"""DINOv2 (Oquab et al. 2023): DINO on class tokens + iBOT on masked patch tokens + KoLeo on the student's class
tokens, with an EMA teacher; and the paper's distillation recipe, where a frozen, already trained (larger)
ViT teaches a smaller student.

Self-distillation: half of the global images are block-masked for the student (ratios spread over
mask_ratio); the teacher sees them whole; iBOT compares both at the masked tokens.
Distillation (objective.distillation.enabled): the teacher is a checkpoint, frozen; as the paper describes,
masking and stochastic depth are removed, iBOT runs on every patch token of the global crops, and an EMA of
the student is kept and is the network evaluated and exported.
"""

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from distill.data.masking import batch_masks, mask_weights
from distill.data.views import MultiCrop
from distill.errors import InputError
from distill.losses.dino import DINOLoss
from distill.losses.ibot import IBOTPatchLoss
from distill.losses.koleo import KoLeoLoss
from distill.models import create_backbone, read_checkpoint
from distill.models.checkpoint import (TrainingCheckpoint, extract_state_dict, flatten_block_chunks,
                                       is_training_checkpoint, load_state, strip_wrappers)
from distill.models.heads import DINOHead
from distill.objectives.base import Objective, StepInfo, build_backbone
from distill.objectives.configs import DINOv2Config
from distill.objectives.self_distillation import (HEAD_OPTIONS, CollapseWatch, PretrainedHeads, TeacherSchedules,
                                                  pretrained_heads)
from distill.seeds import Stream, derived_generator

logger = logging.getLogger(__name__)


class DINOv2Network(nn.Module):
    """Backbone with a DINO head on class tokens and an iBOT head on patch tokens (the same module if shared)."""

    def __init__(self, backbone: nn.Module, config: DINOv2Config, norm_last_layer: bool = True) -> None:
        super().__init__()
        c, dim = config, backbone.embed_dim
        self.backbone = backbone
        self.dino_head = DINOHead(dim, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_layers,
                                  norm_last_layer=norm_last_layer)
        self.ibot_head = (DINOHead(dim, c.ibot_out_dim, c.hidden_dim, c.ibot_bottleneck_dim, c.head_layers,
                                   norm_last_layer=norm_last_layer) if c.separate_heads else None)

    def patch_head(self) -> nn.Module:
        return self.ibot_head if self.ibot_head is not None else self.dino_head


class DINOv2Objective(TeacherSchedules, Objective):
    def __init__(self, config: DINOv2Config, student_backbone: nn.Module, teacher_backbone: nn.Module,
                 seed: int = 0, teacher_heads: Optional[Dict[str, torch.Tensor]] = None,
                 heads: Optional[PretrainedHeads] = None) -> None:
        """Distilling, teacher_backbone holds the frozen teacher's weights already and teacher_heads its DINO / iBOT
        heads from the same file (as DINOv2Network keys), when it has them. heads: the projection heads of
        model.pretrained, restored into the student (and so its teacher or EMA)."""
        super().__init__()
        self.config, self.seed = config, seed
        self.distilling = config.distillation.enabled
        # Distilling, the teacher is frozen: eval mode, out of checkpoints (rebuilt from its file).
        self.frozen = ("teacher",) if self.distilling else ()
        if getattr(student_backbone, "mask_token", None) is None and not self.distilling:
            raise InputError("DINOv2 masks patches: the backbone needs a mask token (mask_token=True)")
        self.student = DINOv2Network(student_backbone, config)
        if heads is not None:
            options = HEAD_OPTIONS
            if not config.separate_heads:  # one head for both losses: its prototypes are out_dim and ibot_out_dim
                options = {**options, "dino_head": {**options["dino_head"], "out_dim": ("out_dim", "ibot_out_dim")}}
            heads.restore(self.student, ["dino_head"] + (["ibot_head"] if config.separate_heads else []), options)
        self.teacher = DINOv2Network(teacher_backbone, config)
        if self.distilling:
            self._load_teacher_heads(teacher_heads or {})
            self.student_ema = copy.deepcopy(self.student)
            for param in self.student_ema.parameters():
                param.requires_grad = False
        else:
            self.teacher.load_state_dict(self.student.state_dict())
            self.student_ema = None
        for param in self.teacher.parameters():
            param.requires_grad = False
        self.dino_loss = DINOLoss(config.out_dim, 2, config.student_temp, config.center_momentum, config.centering)
        self.ibot_loss = IBOTPatchLoss(config.ibot_out_dim, config.student_temp, config.center_momentum,
                                       config.centering)
        self.koleo_loss = KoLeoLoss()
        self.collapse = CollapseWatch(config.out_dim)
        self.plan(1, 1.0)

    def _load_teacher_heads(self, heads: Dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in self.teacher.state_dict().items() if not k.startswith("backbone.")}
        if own and all(k in heads and heads[k].shape == v.shape for k, v in own.items()):
            self.teacher.load_state_dict({k: heads[k] for k in own}, strict=False)
            return
        logger.warning("the teacher checkpoint has no DINO/iBOT heads of this shape: the frozen teacher uses freshly "
                       "initialised heads (a random projection of its features)")

    def views(self, channels: int) -> MultiCrop:
        return MultiCrop(self.config.views, channels)

    def trainable_module(self) -> nn.Module:
        return self.student

    def eval_backbone(self) -> nn.Module:
        return self.student_ema.backbone if self.distilling else self.teacher.backbone

    def scheduled_values(self, step: int) -> Dict[str, float]:
        step = min(step, len(self.momentum_schedule) - 1)
        values = {"teacher_temp": float(self.teacher_temp_schedule[step])}
        if not self.distilling:
            values["momentum"] = float(self.momentum_schedule[step])
        return values

    def masks(self, n_images: int, grid, step: int, device) -> torch.Tensor:
        c = self.config
        if self.distilling:  # the paper's distillation: no masking, iBOT on every patch token
            return torch.ones(n_images, grid[0] * grid[1], dtype=torch.bool, device=device)
        generator = derived_generator(self.seed, step, Stream.MASKS)  # a function of (seed, step): resumes mask alike
        masks = batch_masks(n_images, grid, c.mask_ratio, c.mask_probability, generator, c.max_mask_ratio)
        return masks.to(device)

    def forward(self, batch: Dict[str, Any], info: StepInfo) -> Dict[str, Any]:
        c = self.config
        crops = batch["crops"]
        globals_, locals_ = torch.cat(crops[:2]), crops[2:]
        n_images = globals_.shape[0]
        patch = self.student.backbone.patch_size
        grid = (globals_.shape[-2] // patch, globals_.shape[-1] // patch)
        masks = self.masks(n_images, grid, info.step, globals_.device)
        flat = masks.flatten()
        weights = mask_weights(masks)
        temperature = self.scheduled_values(info.step)["teacher_temp"]

        with torch.no_grad():
            teacher_tokens = self.teacher.backbone.forward_features(globals_)
            teacher_cls = self.teacher.dino_head(teacher_tokens["x_norm_clstoken"])
            teacher_patches = teacher_tokens["x_norm_patchtokens"].flatten(0, 1)[flat]
            teacher_patches = self.teacher.patch_head()(teacher_patches)

        student_masks = None if self.distilling else masks
        global_tokens, local_cls = self._student_tokens(list(crops[:2]), list(locals_), student_masks)
        student_cls = self.student.dino_head(torch.cat([global_tokens["x_norm_clstoken"], *local_cls]))
        student_patches = global_tokens["x_norm_patchtokens"].flatten(0, 1)[flat]
        student_patches = self.student.patch_head()(student_patches)

        dino = self.dino_loss(student_cls, teacher_cls, temperature)
        ibot = self.ibot_loss(student_patches, teacher_patches, weights, n_images, temperature)
        global_cls = global_tokens["x_norm_clstoken"]
        koleo = sum(self.koleo_loss(chunk) for chunk in global_cls.chunk(2)) if c.koleo_loss_weight else dino * 0
        loss = c.dino_loss_weight * dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        stats = self.dino_loss.target_stats
        return {"loss": loss, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo,
                "masked_share": float(flat.float().mean()), "teacher_entropy": stats["entropy"],
                "teacher_top_share": stats["top_share"]}

    def _student_tokens(self, globals_: List[torch.Tensor], locals_: List[torch.Tensor],
                        masks: Optional[torch.Tensor]):
        """Student tokens of the (masked) global crops, concatenated, and the class tokens of the local crops."""
        backbone = self.student.backbone
        if self.config.pack_crops:
            split = list(masks.chunk(len(globals_))) if masks is not None else [None] * len(globals_)
            outs = backbone.forward_features_packed(globals_ + locals_, split + [None] * len(locals_))
            glob = {key: torch.cat([o[key] for o in outs[: len(globals_)]])
                    for key in ("x_norm_clstoken", "x_norm_patchtokens")}
            return glob, [o["x_norm_clstoken"] for o in outs[len(globals_):]]
        glob = backbone.forward_features(torch.cat(globals_), masks=masks)
        local_cls = [backbone.forward_features(torch.cat(locals_))["x_norm_clstoken"]] if locals_ else []
        return glob, local_cls

    def before_optimizer_step(self, info: StepInfo) -> None:
        heads = [self.student.dino_head] + ([self.student.ibot_head] if self.student.ibot_head is not None else [])
        self.freeze_last_layers(heads, info)
        self.freeze_backbone(self.student.backbone, info)

    def after_optimizer_step(self, info: StepInfo) -> None:
        if self.distilling:
            self.update_average(self.student_ema, self.student, self.config.distillation.student_ema_momentum, info)
        else:
            self.update_average(self.teacher, self.student, self.scheduled_values(info.step)["momentum"], info)
            stats = self.dino_loss.target_stats
            self.collapse.update(info.step, float(stats["entropy"]), float(stats["top_share"]))

    def export(self, folder: Path) -> List[Path]:
        """The evaluated backbone (teacher, or the student's EMA when distilling) in the DINOv2 hub layout."""
        network = self.eval_backbone()
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        name = "student_ema_backbone.pth" if self.distilling else "teacher_backbone.pth"
        path = Path(folder) / name
        torch.save(state, path)
        return [path]


def _teacher_weights(path: str) -> Dict[str, torch.Tensor]:
    """backbone.* and head weights of a DINOv2 teacher_checkpoint.pth, of the evaluated network of a distill run,
    or of a bare backbone file (backbone.* only)."""
    obj = read_checkpoint(path)
    if is_training_checkpoint(obj):
        run = TrainingCheckpoint(obj, path)
        return run.network(run.eval_owner())
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):  # DINOv2 teacher_checkpoint.pth
        return {flatten_block_chunks(strip_wrappers(k)): v for k, v in obj["teacher"].items()}
    backbone, _ = extract_state_dict(obj)
    return {f"backbone.{k}": v for k, v in backbone.items()}


def build(config, source=None) -> DINOv2Objective:
    c = config.objective
    student = build_backbone(config.model)
    heads = pretrained_heads(config.model, c.restore_heads)  # continued pretraining: the file's DINO / iBOT heads
    if not c.distillation.enabled:
        return DINOv2Objective(c, student, build_backbone(config.model, stochastic_depth=False), config.train.seed,
                               heads=heads)
    d = c.distillation
    if not d.teacher_checkpoint:
        raise InputError("objective.distillation.teacher_checkpoint is not set: the frozen teacher's weights (a "
                         "DINOv2 teacher_checkpoint.pth, a dinov2_*_pretrain.pth backbone, or a distill run)")
    teacher = create_backbone(d.teacher_backbone, **d.teacher_overrides)
    weights = _teacher_weights(d.teacher_checkpoint)
    load_state(teacher, {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")},
               d.teacher_checkpoint)
    teacher_heads = {k: v for k, v in weights.items() if not k.startswith("backbone.")}
    return DINOv2Objective(c, student, teacher, config.train.seed, teacher_heads=teacher_heads, heads=heads)
