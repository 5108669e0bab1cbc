"""The data sections of a run's config: where images come from and how training views are made. Plain dataclasses,
importable without PyTorch, so that a config is checked in a fraction of a second before anything heavy loads."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from distill.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from distill.errors import InputError

if TYPE_CHECKING:
    from distill.data.eval_views import EvalView

DATASET_KINDS = ("fashion_mnist", "auto", "imagefolder", "folder", "filelist")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def default_normalisation(fashion_mnist: bool = False) -> Tuple[List[float], List[float]]:
    """Mean and std of images whose run does not say: ImageNet's, or Fashion-MNIST's (one channel)."""
    if fashion_mnist:
        return [FASHION_MNIST_MEAN], [FASHION_MNIST_STD]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


@dataclass
class DatasetConfig:
    kind: str = "fashion_mnist"  # fashion_mnist | auto | imagefolder | folder (flat, unlabelled) | filelist
    path: Optional[str] = None  # folder, or text file with one path per line (optionally followed by a label)
    split: str = "train"  # Fashion-MNIST split, or the sub-folder of `path` to use when it exists (train/val)
    limit: int = 0  # use only the first N images (0: all)
    verify: str = "auto"  # auto | yes | no: decode every file once before training to find unreadable ones
    max_image_pixels: int = 0  # Pillow's decompression-bomb limit: 0 its default (89 M pixels), -1 none
    # JPEG files decoded at the size multi-crop's boxes need (DCT scaling to 1/2, 1/4, 1/8 when every box is still
    # at least its crop size there), the boxes drawn on the full image as before: the same crops of the same
    # regions, pixels slightly different from a full decode's. Pays on photos well above the crop size (DINO's
    # crops: most photos from a short side of 700 px decode at 1/2, from 1600 px at 1/4); smaller photos, other
    # formats, and false: decoded in full
    decode_at_crop_size: bool = True

    def validate(self, key: str = "data.dataset") -> None:
        """key: where this section sits in the run config, for the messages."""
        if self.kind not in DATASET_KINDS:
            raise InputError(f"{key}.kind {self.kind!r} unknown: choose one of {', '.join(DATASET_KINDS)}")
        if self.kind != "fashion_mnist" and not self.path:
            raise InputError(f"{key}.kind {self.kind!r} needs {key}.path (a folder or a file list)")
        # YAML reads a bare yes / no as a boolean, which the string field then holds as "True" / "False"
        self.verify = {"true": "yes", "false": "no"}.get(str(self.verify).lower(), self.verify)
        if self.verify not in ("auto", "yes", "no"):
            raise InputError(f"{key}.verify {self.verify!r}: choose auto, yes or no")
        if self.limit < 0:
            raise InputError(f"{key}.limit must be >= 0 (0: every image), got {self.limit}")
        if self.max_image_pixels < -1:
            raise InputError(f"{key}.max_image_pixels must be -1 (no limit), 0 (Pillow's) or a number of pixels, "
                             f"got {self.max_image_pixels}")
        if not isinstance(self.decode_at_crop_size, bool):
            raise InputError(f"{key}.decode_at_crop_size {self.decode_at_crop_size!r}: choose true or false")

    def check_path(self, key: str = "data.dataset", option: Optional[str] = None) -> Optional[Path]:
        """The path, checked to exist and to be what the kind reads (a folder, or a file list); None for
        Fashion-MNIST. `option` names the path in messages (default: {key}.path)."""
        if self.kind == "fashion_mnist":
            return None
        path = Path(self.path).expanduser()
        option = option or f"{key}.path"
        if not path.exists():
            raise InputError(f"{option} {path} does not exist: give a folder of images or a file list")
        if self.kind == "filelist" and not path.is_file():
            raise InputError(f"{key}.path {path} is a folder, but {key}.kind is filelist (a text file of paths)")
        if self.kind in ("imagefolder", "folder") and not path.is_dir():
            raise InputError(f"{key}.path {path} is a file, but {key}.kind is {self.kind} (a folder)")
        return path


@dataclass
class ViewsConfig:
    """The fields every training-view recipe has. Subclasses add their own and say which evaluation view goes with
    them (eval_view)."""

    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def validate(self) -> None:
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3) or min(self.std) <= 0:
            raise InputError("views.mean and views.std need 1 or 3 values each, std positive")

    def channel_stats(self, channels: int):
        """mean and std for images of `channels` channels (grey from RGB statistics, or the reverse)."""
        from distill.data.augment import match_channels

        return match_channels(self.mean, self.std, channels)

    def eval_view(self, channels: int) -> "EvalView":
        """The view features are evaluated at (kNN, classifiers, attention maps) for networks trained on these."""
        raise NotImplementedError


@dataclass
class MultiCropConfig(ViewsConfig):
    global_crops_number: int = 2
    global_crops_size: int = 224
    global_crops_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    global_blur_probs: List[float] = field(default_factory=lambda: [1.0, 0.1])  # per global crop, last repeats
    local_blur_prob: float = 0.5
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])  # pixels of the output crop
    global_solarize_probs: List[float] = field(default_factory=lambda: [0.0, 0.2])
    local_solarize_prob: float = 0.0
    # "fused": jitter, greyscale and normalisation as one colour matrix per crop (hue rotated about the grey
    # axis, one clamp at the end; several times faster); "exact": torchvision's operations one by one.
    color: str = "fused"

    def validate(self) -> None:
        super().validate()
        if self.global_crops_number < 1 or self.local_crops_number < 0:
            raise InputError("views: global_crops_number must be >= 1 and local_crops_number >= 0")
        if self.global_crops_size < 1 or (self.local_crops_number and self.local_crops_size < 1):
            raise InputError("views: crop sizes must be positive")
        for name in ("global_crops_scale", "local_crops_scale", "ratio", "blur_sigma"):
            values = list(getattr(self, name))
            if len(values) != 2 or not 0 < values[0] <= values[1] or (name.endswith("scale") and values[1] > 1):
                raise InputError(f"views.{name} is {values}: it must be [low, high] with 0 < low <= high (<= 1 for "
                                 "scales)")
        probabilities = [self.flip_prob, self.color_jitter_prob, self.grayscale_prob, self.local_blur_prob,
                         self.local_solarize_prob, *self.global_blur_probs, *self.global_solarize_probs]
        if any(not 0 <= p <= 1 for p in probabilities) or not self.global_blur_probs or not self.global_solarize_probs:
            raise InputError("views: probabilities must lie in [0, 1] (blur/solarize lists need one value or more)")
        if self.color not in ("fused", "exact"):
            raise InputError(f"views.color must be 'fused' or 'exact', not {self.color!r}")
        jitter = {"brightness": self.brightness, "contrast": self.contrast, "saturation": self.saturation}
        for name, value in jitter.items():
            if value < 0:
                raise InputError(f"views.{name} must be >= 0 (ColorJitter's strength), got {value}")
        if not 0 <= self.hue <= 0.5:
            raise InputError(f"views.hue must lie in [0, 0.5] (a share of a turn, as ColorJitter's), got {self.hue}")

    def eval_view(self, channels: int) -> "EvalView":
        """The whole image at the global crop size (resized to 256/224 of it, centre-cropped), as DINO evaluates."""
        from distill.data.eval_views import EvalView

        mean, std = self.channel_stats(channels)
        return EvalView(self.global_crops_size, mean, std, channels)


@dataclass
class ClassificationViewsConfig(ViewsConfig):
    input_size: int = 224
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    crop: str = "auto"  # auto (DeiT: random_resized, pad for <= 32 px) | random_resized | pad
    pad: int = 4
    hflip: float = 0.5
    color_jitter: float = 0.3  # used only without auto_augment, as in timm
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm's RandAugment string; null: off
    interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    eval_crop_pct: float = 0.875

    def validate(self) -> None:
        super().validate()
        if self.input_size < 1:
            raise InputError("views.input_size must be positive")
        if self.crop not in ("auto", "random_resized", "pad"):
            raise InputError(f"views.crop {self.crop!r}: choose auto, random_resized or pad")
        if not 0 < self.eval_crop_pct <= 1:
            raise InputError("views.eval_crop_pct must lie in (0, 1]")
        if not (0 <= self.hflip <= 1 and 0 <= self.reprob <= 1):
            raise InputError("views.hflip and views.reprob are probabilities in [0, 1]")

    def eval_view(self, channels: int) -> "EvalView":
        """DeiT's evaluation transform: resize to input_size / crop_pct, centre crop (images already at the input
        size, such as Fashion-MNIST's, are used whole)."""
        from distill.data.eval_views import EvalView

        mean, std = self.channel_stats(channels)
        return EvalView(self.input_size, mean, std, channels, resize_ratio=1 / self.eval_crop_pct)
