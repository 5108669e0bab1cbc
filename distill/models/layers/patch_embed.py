"""Image to patch tokens, with the input checks that turn shape accidents into clear errors."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly embedded: [B, C, H, W] -> [B, (H/p)*(W/p), D]. With a stride below the
    patch size (dense descriptors), overlapping patches: [B, ((H-p)/s+1) * ((W-p)/s+1), D], same weights."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def check_input(self, x: torch.Tensor, stride: Optional[int] = None) -> None:
        p = self.patch_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected images as a [batch, channels, height, width] tensor, got {shape}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            hint = (
                "repeat the grey channel (x.expand(-1, 3, -1, -1)) or build the model with in_chans=1"
                if c == 1
                else f"build the model with in_chans={c} or convert the images to {self.in_chans} channels"
            )
            raise InputError(f"the model takes {self.in_chans}-channel images but got {c} channels: {hint}")
        if stride is not None and stride != p:
            if not 1 <= stride <= p or p % stride:
                raise InputError(f"stride {stride} must divide the patch size {p} (e.g. {p // 2}); a larger one "
                                 "would skip pixels")
            if (h - p) % stride or (w - p) % stride or h < p or w < p:
                fit_h, fit_w = p + max(0, round((h - p) / stride)) * stride, p + max(0, round((w - p) / stride)) * stride
                raise InputError(f"image size {h}x{w} does not fit patches of {p} at stride {stride}: height and "
                                 f"width must be {p} + a multiple of {stride} (e.g. {fit_h}x{fit_w})")
            return
        if h % p or w % p or h < p or w < p:
            fit_h, fit_w = max(p, round(h / p) * p), max(p, round(w / p) * p)
            raise InputError(
                f"image size {h}x{w} is not a multiple of the patch size {p}: "
                f"resize or crop to a multiple of {p} (e.g. {fit_h}x{fit_w})"
            )

    def grid(self, height: int, width: int, stride: Optional[int] = None) -> Tuple[int, int]:
        """The patch grid of an image of height x width: (H/p, W/p), or ((H-p)/s+1, (W-p)/s+1) at stride s."""
        s = stride or self.patch_size
        return (height - self.patch_size) // s + 1, (width - self.patch_size) // s + 1

    def forward(self, x: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        self.check_input(x, stride)
        if stride is None or stride == self.patch_size:
            return self.proj(x).flatten(2).transpose(1, 2)
        out = F.conv2d(x, self.proj.weight, self.proj.bias, stride=stride)
        return out.flatten(2).transpose(1, 2)
