"""DINOv2's PCA pictures (Oquab et al. 2023, Fig. 1 and the facebookresearch/dinov2 demo): one PCA over all patch
descriptors of a set of images; the first component, thresholded, separates the objects from the background;
a second PCA over the foreground patches alone gives three components shown as RGB."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from distill.dense.features import DenseFeatures
from distill.errors import InputError


@dataclass
class PCAPicture:
    rgb: torch.Tensor  # [B, h, w, 3] in [0, 1]; background black
    foreground: torch.Tensor  # [B, h, w] bool
    first: torch.Tensor  # [B, h, w] the first component, scaled to [0, 1] over the set


def _components(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Projections of rows [N, C] on their first `count` principal directions: [N, count] (centred, SVD in
    float64; signs as the SVD gives them)."""
    centred = flat.double() - flat.double().mean(dim=0, keepdim=True)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ directions[:count].t()).float()


def _unit(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp_min(1e-12)


def _border(h: int, w: int) -> torch.Tensor:
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    return border


def pca_picture(features: DenseFeatures, threshold: float = 0.5, foreground_only: bool = True) -> PCAPicture:
    """The picture of a set's descriptors (all images at once, so colours mean the same in every image).

    The first component is oriented so that the image borders (background in most pictures) score low, scaled to
    [0, 1] and thresholded at `threshold`; with foreground_only the RGB components come from a second PCA on the
    foreground patches (DINOv2's way), else from the first PCA."""
    if not 0 < threshold < 1:
        raise InputError(f"threshold {threshold} must lie in (0, 1)")
    patches = features.patches.float()
    B, h, w, C = patches.shape
    if B * h * w < 4:
        raise InputError("a PCA needs at least 4 patches: give larger or more images")
    projected = _components(patches.reshape(-1, C), min(3, C)).reshape(B, h, w, -1)
    first = projected[..., 0]
    border = _border(h, w).expand(B, h, w)
    if (~border).any() and first[border].mean() > first[~border].mean():
        first = -first  # the borders are mostly background: they score low
    first = _unit(first)
    foreground = first > threshold
    rgb = torch.zeros(B, h, w, 3)
    if foreground_only and int(foreground.sum()) >= 4:
        chosen = patches[foreground]
        colours = _components(chosen, min(3, C))
        colours = torch.stack([_unit(colours[:, i]) for i in range(colours.shape[1])], dim=1)
        rgb[foreground] = F.pad(colours, (0, 3 - colours.shape[1]))
    else:
        colours = torch.stack([_unit(projected[..., i]) for i in range(projected.shape[-1])], dim=-1)
        rgb = F.pad(colours, (0, 3 - colours.shape[-1]))
        if foreground_only:
            rgb = rgb * foreground[..., None]
    return PCAPicture(rgb, foreground, first)


def upsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A grid mask [h, w] to pixels [H, W] (nearest cell)."""
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0] > 0.5


def mask_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of one size (1.0 when both are empty)."""
    if predicted.shape != truth.shape:
        raise InputError(f"masks of different sizes {tuple(predicted.shape)} and {tuple(truth.shape)}")
    union = (predicted | truth).sum()
    return 1.0 if int(union) == 0 else float((predicted & truth).sum() / union)


def save_pca_figure(shown: List[torch.Tensor], picture: PCAPicture, path: Path,
                    titles: Optional[Sequence[str]] = None) -> Path:
    """Images side by side over their PCA pictures (and the first component): shown are [H, W, 3] in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(shown)
    fig, axes = plt.subplots(3, count, figsize=(2.2 * count, 6.6), squeeze=False)
    for column, image in enumerate(shown):
        size = image.shape[:2]
        rgb = F.interpolate(picture.rgb[column].permute(2, 0, 1)[None], size=size, mode="nearest")[0]
        first = F.interpolate(picture.first[column][None, None], size=size, mode="nearest")[0, 0]
        rows = [(image.numpy(), "image"), (rgb.permute(1, 2, 0).numpy(), "PCA (foreground)"),
                (first.numpy(), "first component")]
        for row, (panel, label) in enumerate(rows):
            ax = axes[row, column]
            ax.imshow(panel, cmap="viridis" if panel.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(label, fontsize=8)
        if titles:
            axes[0, column].set_title(titles[column], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
