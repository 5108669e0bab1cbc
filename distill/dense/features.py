"""Patch descriptors of any backbone: the tokens of any block, or the keys, queries or values of its attention
(the facets of Amir et al. 2021, "Deep ViT Features as Dense Visual Descriptors"), on a grid of any stride, with
their class token, for images of any size (position embeddings are resized to the grid).

A ResNet gives the feature maps of its stages as its "token" facet (layer 1-4, or -1 for the last).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.dense.kinds import FACETS
from distill.errors import InputError
from distill.precision import autocast, resolve_precision



@dataclass
class DenseFeatures:
    """Descriptors on a grid: patches [B, h, w, C] (the layers asked for, concatenated in their order along C), the
    class token [B, C'] (None for a ResNet), and where each grid cell sits in the image."""

    patches: torch.Tensor
    cls: Optional[torch.Tensor]
    patch_size: int  # pixels each cell sees (a ResNet stage: its downsampling factor)
    stride: int  # pixels between neighbouring cells
    image_size: Tuple[int, int]  # (H, W) of the images the grid was computed on

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.patches.shape[1:3])

    def centers(self) -> torch.Tensor:
        """[h, w, 2] pixel coordinates (x, y) of each cell's patch centre in the input image."""
        h, w = self.grid
        ys = torch.arange(h, dtype=torch.float32) * self.stride + (self.patch_size - 1) / 2
        xs = torch.arange(w, dtype=torch.float32) * self.stride + (self.patch_size - 1) / 2
        return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)

    def flat(self) -> torch.Tensor:
        """[B, h*w, C], row-major over the grid."""
        return self.patches.flatten(1, 2)


def _block_indices(layers: Sequence[int], depth: int, what: str) -> List[int]:
    if not layers:
        raise InputError(f"give at least one {what}")
    indices = [layer + depth if layer < 0 else layer for layer in layers]
    bad = [layer for layer, index in zip(layers, indices) if not 0 <= index < depth]
    if bad:
        raise InputError(f"{what} {bad} out of range: the model has {depth} ({-depth} to {depth - 1})")
    return indices


def _facet_of_block(block: nn.Module, tokens: torch.Tensor, facet: str) -> torch.Tensor:
    """key / query / value of a block's attention for its input tokens [B, N, D] -> [B, N, D] (heads concatenated,
    as in Amir et al.)."""
    attention = block.attn
    B, N, D = tokens.shape
    qkv = attention.qkv(block.norm1(tokens)).reshape(B, N, 3, D)
    return qkv[:, :, {"query": 0, "key": 1, "value": 2}[facet]]


def _vit_features(model, images, indices, facet, stride, norm) -> Tuple[torch.Tensor, torch.Tensor]:
    tokens, _ = model.prepare_tokens(images, stride=stride)
    by_block = {}
    for index, block in enumerate(model.blocks[: max(indices) + 1]):
        if facet != "token" and index in indices:
            by_block[index] = _facet_of_block(block, tokens, facet)
        tokens = block(tokens)
        if facet == "token" and index in indices:
            by_block[index] = model.norm(tokens) if norm else tokens
    outputs = [by_block[index] for index in indices]  # in the order asked for
    patches = torch.cat([out[:, model.num_prefix_tokens:] for out in outputs], dim=-1)
    return patches, torch.cat([out[:, 0] for out in outputs], dim=-1)


def _resnet_features(model, images, stages: List[int]) -> List[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    maps = []
    for number, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        if number > max(stages):
            break
        x = layer(x)
        if number in stages:
            maps.append(x)
    return maps


def log_binned(patches: torch.Tensor, hierarchy: int = 2) -> torch.Tensor:
    """Log-binned descriptors (Amir et al. 2021): each cell takes the mean descriptors of 3x3 neighbourhoods of
    bins 3^k wide, k < hierarchy: the 9 cells around it (k = 0), then the 8 bins around it at each coarser scale,
    1 + 8 * hierarchy bins in all. Beyond the border the nearest bin is repeated. [B, h, w, C] -> [B, h, w,
    C * (1 + 8 * hierarchy)]."""
    if hierarchy < 1:
        return patches
    B, h, w, C = patches.shape
    grid = patches.permute(0, 3, 1, 2)
    ys = torch.arange(h, device=patches.device)
    xs = torch.arange(w, device=patches.device)
    bins = []
    for k in range(hierarchy):
        size = 3**k
        pooled = F.avg_pool2d(grid, size, stride=1, padding=size // 2, count_include_pad=False) if size > 1 else grid
        for dy in (-size, 0, size):
            for dx in (-size, 0, size):
                if k and dy == 0 and dx == 0:
                    continue
                rows = (ys + dy).clamp(0, h - 1)
                cols = (xs + dx).clamp(0, w - 1)
                bins.append(pooled[:, :, rows][:, :, :, cols])
    return torch.cat(bins, dim=1).permute(0, 2, 3, 1)


@torch.inference_mode()
def extract(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[int] = (-1,),
    facet: str = "token",
    stride: Optional[int] = None,
    norm: bool = True,
    log_bins: int = 0,
    chunk: int = 16,
    precision: str = "fp32",
) -> DenseFeatures:
    """Descriptors of normalised images [B, C, H, W] on the patch grid, in chunks of `chunk` images (memory bounded
    whatever B); float32 on the CPU.

    layers: block indices (negative from the end), concatenated along C. facet: "token" (the block's output;
    norm=True applies the model's final LayerNorm, as DINOv2's patch features are), or "key", "query", "value" of
    the block's attention. stride: pixels between patches, a divisor of the patch size (default: the patch size);
    smaller gives overlapping patches, grid ((H - p) / s + 1) x ((W - p) / s + 1). Register and distillation tokens
    never enter the grid. log_bins > 0: log-binned descriptors of that hierarchy.
    """
    if facet not in FACETS:
        raise InputError(f"facet {facet!r} unknown: choose one of {', '.join(FACETS)}")
    if images.ndim != 4:
        raise InputError(f"expected images [batch, channels, height, width], got shape {tuple(images.shape)}")
    if chunk < 1:
        raise InputError("chunk must be positive")
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "blocks"):
            indices = _block_indices(layers, len(model.blocks), "layer")
            patch_size, step = model.patch_size, stride or model.patch_size
            model.patch_embed.check_input(images[:1], stride)  # a bad size or stride fails before any work
            grid = model.patch_embed.grid(images.shape[-2], images.shape[-1], stride)
            outputs, classes = [], []
            for start in range(0, len(images), chunk):
                batch = images[start:start + chunk].to(device)
                with autocast(precision, device):
                    patches, cls = _vit_features(model, batch, indices, facet, stride, norm)
                outputs.append(patches.float().cpu().reshape(len(batch), grid[0], grid[1], -1))
                classes.append(cls.float().cpu())
            patches, cls = torch.cat(outputs), torch.cat(classes)
        elif hasattr(model, "layer4"):
            if facet != "token":
                raise InputError(f"facet {facet!r} is a transformer's attention; a ResNet has only 'token' (the "
                                 "feature maps of its stages)")
            if stride is not None:
                raise InputError("stride applies to a transformer's patches; a ResNet's grid is set by its stages")
            stages = [s + 5 if s < 0 else s for s in layers]
            if any(not 1 <= s <= 4 for s in stages):
                raise InputError(f"layers {list(layers)} out of range for a ResNet: stages 1-4 (or -4 to -1)")
            finest = min(stages)
            patch_size = step = 2 ** (finest + 1)
            outputs = []
            for start in range(0, len(images), chunk):
                batch = images[start:start + chunk].to(device)
                with autocast(precision, device):
                    maps = _resnet_features(model, batch, sorted(set(stages)))
                by_stage = dict(zip(sorted(set(stages)), maps))
                size = by_stage[finest].shape[-2:]
                resized = [F.interpolate(by_stage[s].float(), size=size, mode="bilinear", align_corners=False)
                           for s in stages]  # coarser stages upsampled to the finest grid asked for
                outputs.append(torch.cat(resized, dim=1).permute(0, 2, 3, 1).cpu())
            patches, cls = torch.cat(outputs), None
        else:
            raise InputError(f"{type(model).__name__} is neither a ViT of this package nor a ResNet backbone")
    finally:
        model.train(was_training)
    if log_bins:
        patches = log_binned(patches, log_bins)
    return DenseFeatures(patches, cls, patch_size, step, tuple(images.shape[-2:]))
