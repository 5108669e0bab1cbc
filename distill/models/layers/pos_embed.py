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


# ---------------------------------------------------------------------------------------------- symbolic sizes
# torch.export (and the ONNX exporter built on it) traces with symbolic image sizes: a Python branch on the grid,
# or F.interpolate with a scale factor computed from it, would freeze the export to one size. The same resize is
# written below as two interpolation matrices built in the graph from the new grid (rows @ grid @ columns^T), with
# the weights of PyTorch's bicubic kernels (aten/src/ATen/native/UpSample.h: Keys' cubic, A = -0.75, clamped
# borders; with antialias, UpSampleKernel.cpp's separable filter, A = -0.5, normalised weights as in Pillow).


def _cubic_kernel(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel at distances x (any shape), zero beyond 2."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def interpolation_matrix(rows: torch.Tensor, old_size: int, offset: float = 0.0,
                         antialias: bool = True) -> torch.Tensor:
    """[new, old] weights of a 1-D bicubic resize from old to new samples, as F.interpolate computes them.

    rows: a float tensor [new] holding 0..new-1 (its length may be symbolic). offset > 0: the scale factor
    (new + offset) / old convention, offset == 0: the exact-size one.
    """
    count = rows[-1:] + 1  # [1]: the new size as a tensor, so that no Python value depends on it
    scale = old_size / (count + offset)  # input samples per output sample
    columns = torch.arange(old_size, dtype=rows.dtype, device=rows.device)
    if antialias:
        stretch = torch.clamp(scale, min=1.0)  # the kernel widens by the scale when downsampling
        centre = scale * (rows + 0.5)
        weights = _cubic_kernel((columns[None, :] + 0.5 - centre[:, None]) / stretch, -0.5)
        weights = weights / weights.sum(dim=1, keepdim=True)
    else:
        source = (rows + 0.5) * scale - 0.5
        base = torch.floor(source)
        taps = torch.arange(-1, 3, dtype=rows.dtype, device=rows.device)
        index = (base[:, None] + taps).clamp(0, old_size - 1)  # [new, 4], borders repeated
        tap_weights = _cubic_kernel(source[:, None] - base[:, None] - taps, -0.75)
        weights = ((index[:, :, None] == columns) * tap_weights[:, :, None]).sum(dim=1)
    return weights


def _identity(rows: torch.Tensor, old_size: int) -> torch.Tensor:
    """[new, old] with ones where row == column (the identity when new == old)."""
    return (rows[:, None] == torch.arange(old_size, dtype=rows.dtype, device=rows.device)).to(rows.dtype)


def resize_pos_embed_traceable(
    patch_pos_embed: torch.Tensor,
    old_grid: Tuple[int, int],
    new_grid: Tuple[int, int],
    offset: float = 0.0,
    antialias: bool = True,
) -> torch.Tensor:
    """resize_pos_embed for symbolic new_grid sizes (torch.export, ONNX): [1, old_h*old_w, D] -> [1, new_h*new_w, D].

    The same numbers to float32 rounding (about 1e-5 of the values, as far as F.interpolate's float32 kernels are
    from the exact result), and the embedding itself at the trained grid.
    """
    dim = patch_pos_embed.shape[-1]
    old_h, old_w = old_grid
    device = patch_pos_embed.device
    rows_h = torch.arange(new_grid[0], dtype=torch.float32, device=device)
    rows_w = torch.arange(new_grid[1], dtype=torch.float32, device=device)
    same_h, same_w = (rows_h[-1:] + 1) == old_h, (rows_w[-1:] + 1) == old_w  # [1] each
    if offset and not antialias:
        # Without antialiasing the scale factor (n + offset) / n resizes an axis of unchanged size too (not the
        # identity), unless the whole grid is the trained one (the models skip the resize then); the antialiased
        # kernel leaves an axis of unchanged size as it is.
        same_h = same_w = same_h & same_w
    weight_h = torch.where(same_h, _identity(rows_h, old_h), interpolation_matrix(rows_h, old_h, offset, antialias))
    weight_w = torch.where(same_w, _identity(rows_w, old_w), interpolation_matrix(rows_w, old_w, offset, antialias))
    grid = patch_pos_embed.float().reshape(old_h, old_w * dim)
    grid = (weight_h @ grid).reshape(-1, old_w, dim)  # [new_h, old_w, D]
    grid = weight_w @ grid  # [new_h, new_w, D]
    return grid.reshape(1, -1, dim).to(patch_pos_embed.dtype)
