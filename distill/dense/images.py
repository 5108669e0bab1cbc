"""Images for dense work: each file decoded and resized whole (no crop) to one size that fits the patch grid, so
that every pixel of the original maps to the grid and back by two scale factors."""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from distill.data.augment import match_channels
from distill.data.filelists import readable_name
from distill.data.images import describe_error, load_image
from distill.errors import InputError


def fitting_size(size: int, patch_size: int, stride: Optional[int] = None) -> int:
    """The side nearest to `size` that the grid covers exactly: patch + a multiple of the stride."""
    step = stride or patch_size
    return patch_size + max(0, round((size - patch_size) / step)) * step


@dataclass
class DenseImages:
    """Normalised images [B, C, S, S], the files they came from, their original (height, width), and the files
    that could not be read (with why), which have no row."""

    images: torch.Tensor
    paths: List[str]
    original_sizes: List[Tuple[int, int]]
    skipped: List[str]  # "path (why)", for messages
    skipped_paths: List[str] = field(default_factory=list)  # the same files, as paths

    # Points are in pixel-index coordinates, as keypoint annotations and pictures take them: pixel i covers
    # [i - 0.5, i + 0.5], so a whole-image resize by s maps x to (x + 0.5) * s - 0.5 (the edges to the edges),
    # not to x * s, which would move every point by (s - 1) / 2 pixels towards the top left.

    def to_original(self, index: int, points: torch.Tensor) -> torch.Tensor:
        """Points (x, y) [N, 2] in the resized image -> the original image's pixels."""
        height, width = self.original_sizes[index]
        side = self.images.shape[-1]
        return (points + 0.5) * torch.tensor([width / side, height / side]) - 0.5

    def to_resized(self, index: int, points: torch.Tensor) -> torch.Tensor:
        """Points (x, y) [N, 2] in the original image -> the resized image's pixels."""
        height, width = self.original_sizes[index]
        side = self.images.shape[-1]
        return (points + 0.5) * torch.tensor([side / width, side / height]) - 0.5


def load_dense_images(paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float],
                      channels: int, allow_none: bool = False) -> DenseImages:
    """Decode, resize whole to size x size (bicubic, antialiased), normalise. An unreadable file is left out and
    named; none readable is an error (with allow_none, an empty batch that names them: one chunk of many)."""
    mode = "L" if channels == 1 else "RGB"
    mean, std = match_channels(list(mean), list(std), channels)
    tensors, kept, sizes, skipped, skipped_paths = [], [], [], [], []
    for path in paths:
        try:
            image = load_image(path, mode)
        except Exception as error:
            skipped.append(f"{readable_name(str(path))} ({describe_error(error)})")
            skipped_paths.append(str(path))
            continue
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.reshape(image.height, image.width, channels).permute(2, 0, 1).float().div_(255.0)
        resized = F.interpolate(pixels[None], size=(size, size), mode="bicubic", antialias=True,
                                align_corners=False)[0].clamp_(0, 1)
        m = torch.tensor(mean).view(-1, 1, 1)
        s = torch.tensor(std).view(-1, 1, 1)
        tensors.append((resized - m) / s)
        kept.append(str(path))
        sizes.append((image.height, image.width))
    if not tensors and not allow_none:
        raise InputError(f"none of the {len(paths)} image(s) could be read: {'; '.join(skipped)}")
    images = torch.stack(tensors) if tensors else torch.empty(0, channels, size, size)
    return DenseImages(images, kept, sizes, skipped, skipped_paths)


def display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised [C, H, W] image back to [H, W, 3] in [0, 1], for pictures."""
    channels = image.shape[0]
    mean, std = match_channels(list(mean), list(std), channels)
    pixels = (image.float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).clamp(0, 1)
    return pixels.expand(3, -1, -1).permute(1, 2, 0) if channels == 1 else pixels.permute(1, 2, 0)
