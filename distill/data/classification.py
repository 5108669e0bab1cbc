"""DeiT's supervised views, built from timm's own pieces: random resized crop (or DeiT's pad-and-crop for images
of 32 px and less), flip, RandAugment, normalisation and random erasing; the evaluation view resizes by
1 / crop_pct and centre-crops.

timm draws its random choices from Python's, NumPy's and PyTorch's global generators. Each image is
augmented with all three seeded from the loader's per-sample (or per-batch) generator and restored afterwards,
so a resumed run sees the views the uninterrupted one would have, and training's own randomness is untouched.
"""

from typing import Any, Dict, List, Optional

import torch
from PIL import Image

from distill.data.configs import ClassificationViewsConfig
from distill.seeds import seeded_globals


class ClassificationViews:
    """One augmented view per image: batches are {"crops": [images [B, C, S, S]]}."""

    def __init__(self, config: ClassificationViewsConfig, channels: int) -> None:
        from timm.data import create_transform
        from torchvision import transforms

        config.validate()
        self.config, self.channels = config, channels
        mean, std = config.channel_stats(channels)
        self.mean, self.std = mean, std
        self.transform = create_transform(
            config.input_size, is_training=True, scale=tuple(config.scale), ratio=tuple(config.ratio),
            hflip=config.hflip, color_jitter=config.color_jitter, auto_augment=config.auto_augment or None,
            interpolation=config.interpolation, mean=tuple(mean), std=tuple(std), re_prob=config.reprob,
            re_mode=config.remode, re_count=config.recount)
        pad = config.crop == "pad" or (config.crop == "auto" and config.input_size <= 32)
        if pad:  # DeiT's choice for CIFAR-sized images
            self.transform.transforms[0] = transforms.RandomCrop(config.input_size, padding=config.pad)
        self.mode = "L" if channels == 1 else "RGB"
        _keep_old_posterize(self.transform)

    @property
    def min_image_size(self) -> int:
        return 0  # timm's crop works on any size

    def _one(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        array = image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()
        pil = Image.fromarray(array, mode=None).convert(self.mode)
        with seeded_globals(seed):
            return self.transform(pil)

    def array_batch(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> List[torch.Tensor]:
        """uint8 images [B, C, H, W] -> [views [B, C, S, S]], each image seeded from the batch's generator."""
        seeds = torch.randint(0, 2**62, (len(images),), generator=generator).tolist()
        return [torch.stack([self._one(image, seed) for image, seed in zip(images, seeds)])]

    def image_sample(self, image: torch.Tensor, generator: Optional[torch.Generator]) -> Dict[str, Any]:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return {"crops": [self._one(image, seed)], "params": [{}]}

    def collate(self, samples: List[Dict[str, Any]]) -> List[torch.Tensor]:
        return [torch.stack([s["crops"][0] for s in samples])]


def _posterize(image: Image.Image, bits: int, **kwargs) -> Image.Image:
    """timm's posterize as DeiT ran it: 0 bits kept gives a black image (recent Pillow refuses 0 bits)."""
    from PIL import ImageOps

    if bits >= 8:
        return image
    return Image.new(image.mode, image.size) if bits <= 0 else ImageOps.posterize(image, bits)


def _keep_old_posterize(transform) -> None:
    """RandAugment's posterize with magnitude noise can ask for 0 bits: keep the result older Pillow gave."""
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
