"""Self-attention maps of the class token in the last block, per head, and DINO's thresholded masks."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError


@torch.no_grad()
def class_token_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention of the class token to the patch tokens in the last block: [B, heads, H/p, W/p], rows sum
    to at most 1 (the rest goes to the class, distillation and register tokens)."""
    if not hasattr(backbone, "get_last_self_attention"):
        raise InputError("attention maps need a ViT backbone (this one has no self-attention)")
    probs = backbone.get_last_self_attention(images)
    grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
    patches = probs[:, :, 0, backbone.num_prefix_tokens :]
    return patches.reshape(images.shape[0], probs.shape[1], *grid)


def threshold_masks(attention: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """DINO's masks: per head, the smallest set of patches that holds `threshold` of the attention mass."""
    flat = attention.flatten(2)
    values, order = torch.sort(flat, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    keep_sorted = torch.cumsum(values, dim=-1) > (1 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.reshape(attention.shape)


def _display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [C, H, W] back to an [H, W, 3] array in [0, 1]."""
    m = torch.tensor(list(mean)).view(-1, 1, 1)
    s = torch.tensor(list(std)).view(-1, 1, 1)
    pixels = (image.float().cpu() * s + m).clamp(0, 1)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels.permute(1, 2, 0).numpy()


def _colour_masks(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The image dimmed, each head's mask painted over it in its own colour."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    picture = image * 0.35
    for head, mask in enumerate(masks):
        colour = np.array(colours[head % len(colours)])
        picture = np.where(mask[..., None] > 0, 0.5 * picture + 0.5 * colour, picture)
    return picture


def save_attention_figure(images: torch.Tensor, attention: torch.Tensor, masks: torch.Tensor, path: Path,
                          mean: Sequence[float], std: Sequence[float], titles: Optional[Sequence[str]] = None) -> Path:
    """One row per image: the image, the mean attention over heads on it, each head's map, the head masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count, heads = attention.shape[:2]
    size = images.shape[-2:]
    upsample = lambda t: F.interpolate(t.float(), size=size, mode="nearest")  # noqa: E731
    maps, mask_maps = upsample(attention), upsample(masks.float())
    columns = heads + 3
    fig, axes = plt.subplots(count, columns, figsize=(1.6 * columns, 1.7 * count), squeeze=False)
    for row in range(count):
        shown = _display(images[row], mean, std)
        panels = [("image", shown, None), ("mean attention", shown, maps[row].mean(0))]
        panels += [(f"head {h}", None, maps[row, h]) for h in range(heads)]
        panels.append(("head masks", _colour_masks(shown, mask_maps[row].numpy()), None))
        for column, (title, picture, overlay) in enumerate(panels):
            ax = axes[row, column]
            if picture is not None:
                ax.imshow(picture)
            if overlay is not None:
                ax.imshow(overlay.numpy(), cmap="inferno", alpha=0.6 if picture is not None else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        if titles:
            axes[row, 0].set_ylabel(titles[row], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class AttentionFigure:
    path: Path
    shown: int  # images drawn
    skipped: List[str]  # files that could not be read, with why


def attention_figure(backbone: nn.Module, source, view, count: int, path: Path, device: torch.device,
                     threshold: float = 0.6) -> AttentionFigure:
    """Attention maps of the first `count` images of a source, through the evaluation view. An unreadable file is
    left out and named (no other image takes its place); none readable is an error."""
    from distill.data.datasets import slice_source
    from distill.data.eval_views import EvalView
    from distill.data.filelists import readable_name
    from distill.data.images import describe_error
    from distill.eval.features import evaluation_batches

    if view is None:
        size = backbone.config["img_size"][0]
        view = EvalView(size, [0.5], [0.5], backbone.config["in_chans"])
    chosen = slice_source(source, 0, count)
    skipped: List[int] = []
    batches = list(evaluation_batches(chosen, view, max(1, len(chosen)), torch.device("cpu"), desc="attention",
                                      skipped=skipped))
    reasons = []
    for index in skipped:
        try:
            chosen.load(index)
            reasons.append(f"{readable_name(chosen.paths[index])} (unreadable)")
        except Exception as error:
            reasons.append(f"{readable_name(chosen.paths[index])} ({describe_error(error)})")
    if not batches:
        raise InputError(f"none of the {len(chosen)} image(s) could be read: {'; '.join(reasons)}")
    images = torch.cat([b["images"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches]) if batches[0]["labels"] is not None else None
    was_training = backbone.training
    backbone.eval()
    try:
        attention = class_token_attention(backbone, images.to(device)).float().cpu()
    finally:
        backbone.train(was_training)
    titles = None
    if labels is not None and getattr(source, "classes", None):
        titles = [source.classes[int(label)] for label in labels]
    save_attention_figure(images, attention, threshold_masks(attention, threshold), path, view.mean, view.std, titles)
    return AttentionFigure(Path(path), len(images), reasons)
