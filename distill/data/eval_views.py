"""The evaluation view: the whole image, resized and centre-cropped (DINO's 256 -> 224), normalised. (Which view goes
with a recipe of training views: ViewsConfig.eval_view, in data/configs.py.)"""

from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from distill.data import augment


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


