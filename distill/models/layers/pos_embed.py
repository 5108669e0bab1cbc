"""Resizing learned position embeddings to another patch grid, by both official conventions.

- offset (DINO, DINOv2 without registers): bicubic with scale factor (grid + offset) / trained_grid, offset 0.1,
  no antialiasing. The offset is a historical guard against floating-point error in the output size; keeping it
  keeps the exact numbers of the released models.
- exact (DINOv2 with registers, timm): bicubic to the exact grid size, with antialiasing.
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def resize_pos_embed(
    patch_pos_embed: torch.Tensor,
    old_grid: Tuple[int, int],
    new_grid: Tuple[int, int],
    offset: float = 0.0,
    antialias: bool = True,
) -> torch.Tensor:
    """[1, old_h*old_w, D] -> [1, new_h*new_w, D]; computed in float32, returned in the input dtype.

    offset > 0 selects the scale-factor convention, offset == 0 the exact-size one.
    """
    if tuple(old_grid) == tuple(new_grid):
        return patch_pos_embed
    dim = patch_pos_embed.shape[-1]
    grid = patch_pos_embed.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((new_grid[0] + offset) / old_grid[0], (new_grid[1] + offset) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias)
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])} instead of {tuple(new_grid)}")
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos_embed.dtype)
