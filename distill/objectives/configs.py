"""The objective sections of a run's config, one per paradigm, and the registry of their names. Plain dataclasses,
importable without PyTorch: `objective.name` picks the section, which is checked before anything heavy loads;
the objective itself (objectives/<name>.py) is imported only to build it."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from distill.data.configs import ClassificationViewsConfig, MultiCropConfig
from distill.errors import InputError
from distill.losses.kinds import CENTERINGS, CRITERIA, DISTILLATION_TYPES


@dataclass
class ObjectiveConfig:
    """The objective's section of a run's config; subclasses add their fields and check them in validate()."""

    name: str = "dino"

    def validate(self) -> None:
        pass


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
    # Continued pretraining (model.pretrained): the projection heads of the file are restored when it has them
    # (false: fresh heads on its backbone); from a released backbone with fresh heads, the student's backbone gets
    # no update for the first freeze_backbone_epochs, while the heads learn to read it.
    restore_heads: bool = True
    freeze_backbone_epochs: float = 0.0
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
        for option in ("freeze_backbone_epochs", "freeze_last_layer_epochs"):
            if getattr(self, option) < 0:
                raise InputError(f"objective.{option} is {getattr(self, option)}: give a number of epochs >= 0 "
                                 "(0: no freezing)")


@dataclass
class DINOConfig(SelfDistillationConfig):
    name: str = "dino"
    use_bn_in_head: bool = False
    norm_last_layer: bool = True


def _dinov2_views() -> MultiCropConfig:
    return MultiCropConfig(global_crops_scale=[0.32, 1.0], local_crops_scale=[0.05, 0.32])


@dataclass
class DistillationConfig:
    enabled: bool = False
    teacher_backbone: str = "dinov2_vitg14"  # registered name of the frozen teacher
    teacher_overrides: Dict[str, Any] = field(default_factory=dict)
    teacher_checkpoint: Optional[str] = None  # a DINOv2 teacher_checkpoint.pth, a distill run, or a backbone file
    student_ema_momentum: float = 0.999  # the spare EMA of the student, evaluated and exported


@dataclass
class DINOv2Config(SelfDistillationConfig):
    """DINOv2's defaults (Oquab et al. 2023, facebookresearch/dinov2 ssl_default_config.yaml)."""

    name: str = "dinov2"
    ibot_out_dim: int = 65536  # iBOT head prototypes (the DINO head's when shared)
    separate_heads: bool = False  # DINOv2's large configs: separate iBOT head (131072 prototypes, bottleneck 384)
    ibot_bottleneck_dim: int = 256
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30.0
    momentum_teacher: float = 0.992
    mask_ratio: List[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_probability: float = 0.5
    max_mask_ratio: float = 0.5  # largest share of an image one mask block may cover
    pack_crops: bool = False  # student: global and local crops in one backbone pass (block-diagonal attention)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    views: MultiCropConfig = field(default_factory=_dinov2_views)

    def validate(self) -> None:
        super().validate()
        if self.ibot_out_dim < 1:
            raise InputError("objective.ibot_out_dim must be positive")
        if not self.separate_heads and self.ibot_out_dim != self.out_dim:
            raise InputError("objective.ibot_out_dim differs from out_dim but the heads are shared: set "
                             "objective.separate_heads=true or make them equal")
        if len(self.mask_ratio) != 2:
            raise InputError(f"objective.mask_ratio is {list(self.mask_ratio)}: give two numbers [low, high], e.g. "
                             "[0.1, 0.5]")
        low, high = self.mask_ratio
        if not 0 <= low <= high <= 1 or not 0 <= self.mask_probability <= 1 or not 0 < self.max_mask_ratio <= 1:
            raise InputError("objective: mask_ratio [low, high] within [0, 1], mask_probability and max_mask_ratio "
                             "in [0, 1]")
        if min(self.dino_loss_weight, self.ibot_loss_weight, self.koleo_loss_weight) < 0:
            raise InputError("objective: loss weights must be >= 0")
        if self.views.global_crops_number != 2:
            raise InputError("DINOv2 uses exactly 2 global crops (views.global_crops_number=2)")


@dataclass
class TeacherConfig:
    name: str = "regnety_160"  # a timm or torchvision name ("timm:...", "torchvision:..." to choose)
    weights: Optional[str] = None  # local weight file (timm / torchvision layout, or a distill run); "hub": timm's
    in_chans: int = 0  # 0: the student's image channels
    img_size: int = 0  # 0: the student's input size; else the images are resized for the teacher
    mean: Optional[List[float]] = None  # null: the student's normalisation
    std: Optional[List[float]] = None


@dataclass
class DeiTConfig(ObjectiveConfig):
    name: str = "deit"
    num_classes: int = 0  # 0: the dataset's number of classes
    distillation_type: str = "none"  # none | soft | hard
    alpha: float = 0.5
    tau: float = 1.0
    criterion: str = "auto"  # auto (DeiT) | ce | bce
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    repeated_aug: int = 3  # DeiT's repeated augmentation: each image this many times per batch (0 or 1: off)
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    new_heads: bool = False  # fine-tune on other classes: model.pretrained loads without its classifier heads
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ClassificationViewsConfig = field(default_factory=ClassificationViewsConfig)

    def validate(self) -> None:
        self.views.validate()
        if self.distillation_type not in DISTILLATION_TYPES:
            raise InputError(f"objective.distillation_type {self.distillation_type!r}: choose one of "
                             f"{', '.join(DISTILLATION_TYPES)}")
        if self.criterion not in CRITERIA:
            raise InputError(f"objective.criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        if not 0 <= self.alpha <= 1 or self.tau <= 0:
            raise InputError("objective: need 0 <= alpha <= 1 and tau > 0")
        if min(self.mixup, self.cutmix, self.mixup_prob, self.smoothing) < 0 or self.num_classes < 0:
            raise InputError("objective: mixup, cutmix, mixup_prob, smoothing and num_classes must be >= 0")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise InputError(f"objective.mixup_mode {self.mixup_mode!r}: choose batch, pair or elem")

    @property
    def mixup_active(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)
