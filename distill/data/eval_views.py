"""The evaluation view (the whole image, resized and centre-cropped, DINO's 256 -> 224, normalised), and what every
recipe of training views shares: the normalisation, and the evaluation view that goes with the views.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from distill.data import augment
from distill.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from distill.errors import InputError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def default_normalisation(fashion_mnist: bool = False) -> Tuple[List[float], List[float]]:
    """Mean and std of images whose run does not say: ImageNet's, or Fashion-MNIST's (one channel)."""
    if fashion_mnist:
        return [FASHION_MNIST_MEAN], [FASHION_MNIST_STD]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


class EvalView:
    """Makes the single, deterministic view of each image that features are extracted from."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], channels: int,
                 resize_ratio: float = 256 / 224) -> None:
        self.size, self.channels, self.resize_ratio = size, channels, resize_ratio
        self.mean, self.std = augment.match_channels(mean, std, channels)
        self.min_image_size = size

    def at_size(self, size: int) -> "EvalView":
        """The same view at another size."""
        return EvalView(size, self.mean, self.std, self.channels, self.resize_ratio)

    def describe(self) -> Dict[str, Any]:
        """Plain values that rebuild the view (EvalView(**described, channels=...))."""
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "resize_ratio": self.resize_ratio}

    def _normalize(self, floats: torch.Tensor) -> torch.Tensor:
        return augment.normalize(floats, self.mean, self.std, self.channels)

    def array_batch(self, images: torch.Tensor, generator=None) -> List[torch.Tensor]:
        """uint8 [B, C, H, W]; images already at the evaluation size are used whole (e.g. Fashion-MNIST)."""
        floats = images.float().div_(255.0)
        if floats.shape[-2:] != (self.size, self.size):
            floats = F.interpolate(floats, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return [self._normalize(floats)]

    def image_sample(self, image: torch.Tensor, generator=None) -> Dict[str, Any]:
        short = int(round(self.size * self.resize_ratio))
        image = TF.resize(image, [short], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return {"crops": [TF.center_crop(image, [self.size, self.size])], "params": [{}]}

    def collate(self, samples: List[Dict[str, Any]]) -> List[torch.Tensor]:
        return [self._normalize(torch.stack([s["crops"][0] for s in samples]).float().div_(255.0))]


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
        return augment.match_channels(self.mean, self.std, channels)

    def eval_view(self, channels: int) -> EvalView:
        """The view features are evaluated at (kNN, classifiers, attention maps) for networks trained on these."""
        raise NotImplementedError
