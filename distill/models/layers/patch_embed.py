"""Image to patch tokens, with the input checks that turn shape accidents into clear errors."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError

# Up to this many pixels per image (64 x 64), training on a CPU embeds patches as one matrix product over the
# unfolded patches rather than through the convolution kernel, whose backward is slow for such shapes. Forward +
# backward, 2-core AVX2 machine, fp32: 128 x 1 x 28 px, patch 7, width 128: 5.9 ms convolution vs 0.7 unfolded;
# 512 x 1 x 14 px: 7.7 vs 0.9; 128 x 3 x 32 px, patch 4, width 192: 5.2 vs 4.2; 64 x 3 x 64 px, patch 8, width 384:
# 11.9 vs 11.3. Larger images go on through the kernel: 64 x 3 x 224 px, patch 14, width 384: 108 vs 135.
SMALL_IMAGE_PIXELS = 64 * 64


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
            if self._unfold_pays(x):
                return self._embed_unfolded(x)
            return self.proj(x).flatten(2).transpose(1, 2)
        out = F.conv2d(x, self.proj.weight, self.proj.bias, stride=stride)
        return out.flatten(2).transpose(1, 2)

    def _unfold_pays(self, x: torch.Tensor) -> bool:
        """Training on a CPU with small images (the convolution kernel's slow backward); never while exporting or
        tracing (torch.export, the ONNX exporters), which are asked first: there the image size is symbolic, and
        comparing it would fix the graph to one side of the bound."""
        return (not torch.compiler.is_exporting() and not torch.jit.is_tracing()
                and x.device.type == "cpu" and torch.is_grad_enabled() and self.proj.weight.requires_grad
                and x.shape[-2] * x.shape[-1] <= SMALL_IMAGE_PIXELS)

    def _embed_unfolded(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's output as one matrix product: each patch's pixels, in the weight's (channel, row,
        column) order, times the flattened kernel."""
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
