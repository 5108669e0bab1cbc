"""Fashion-MNIST mosaics: a small, deterministic dense task built from the real dataset. Each canvas holds a few
28 x 28 items on black, with a per-pixel mask of their classes, their boxes, and, for correspondence, a random
warp of any image with the homography that maps its points.

Mask values: 0 background, 1 + the Fashion-MNIST class (1-10) where an item's pixel is brighter than
FOREGROUND_THRESHOLD, and IGNORE_INDEX (255) where nothing is known (outside the source after a warp).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from distill.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from distill.errors import InputError

ITEM_SIZE = 28
FOREGROUND_THRESHOLD = 30  # item pixels above this are the item; below, the black of the canvas shows through
IGNORE_INDEX = 255
MOSAIC_CLASSES: Tuple[str, ...] = ("background",) + tuple(FASHION_MNIST_CLASSES)
PLACEMENT_TRIES = 50


@dataclass
class Mosaics:
    """Canvases and what is on them.

    images: uint8 [N, S, S]; masks: uint8 [N, S, S] (0 background, 1 + class). Per mosaic i, for its k items:
    labels[i] int64 [k] (Fashion-MNIST class 0-9), boxes[i] int64 [k, 4] (x0, y0, x1, y1: the tight box of the
    item's foreground, ends exclusive), offsets[i] int64 [k, 2] (x, y of the item's 28 x 28 frame), sources[i] int64
    [k] (index of the item in the split). Items are drawn in order; where two overlap the brighter pixel shows.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: List[torch.Tensor]
    boxes: List[torch.Tensor]
    offsets: List[torch.Tensor]
    sources: List[torch.Tensor]
    split: str
    classes: Tuple[str, ...] = field(default=MOSAIC_CLASSES)

    def __len__(self) -> int:
        return len(self.images)


def _place(occupied: np.ndarray, foreground: np.ndarray, rng: np.random.Generator, max_overlap: float
           ) -> Tuple[int, int]:
    """(x, y) of an item's frame: random positions until one where at most `max_overlap` of the item's foreground
    falls on earlier items; after PLACEMENT_TRIES the least overlapping position seen (so a crowded canvas still
    gets all its items)."""
    size = occupied.shape[0]
    area = max(int(foreground.sum()), 1)
    best = None
    for _ in range(PLACEMENT_TRIES):
        x, y = (int(v) for v in rng.integers(0, size - ITEM_SIZE + 1, size=2))
        overlap = float((occupied[y:y + ITEM_SIZE, x:x + ITEM_SIZE] & foreground).sum()) / area
        if best is None or overlap < best[0]:
            best = (overlap, x, y)
        if overlap <= max_overlap:
            break
    return best[1], best[2]


def _tight_box(foreground: np.ndarray, x: int, y: int) -> List[int]:
    """(x0, y0, x1, y1), ends exclusive, of the foreground [28, 28] placed at (x, y); the frame if it is empty."""
    rows, cols = np.nonzero(foreground)
    if len(rows) == 0:
        return [x, y, x + ITEM_SIZE, y + ITEM_SIZE]
    return [x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1]


def _one_mosaic(items: np.ndarray, labels: np.ndarray, size: int, count_range: Tuple[int, int],
                rng: np.random.Generator, max_overlap: float):
    count = int(rng.integers(count_range[0], count_range[1] + 1))
    chosen = rng.integers(0, len(items), size=count)
    canvas = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    occupied = np.zeros((size, size), bool)
    boxes, offsets = [], []
    for index in chosen:
        item = items[index]
        foreground = item > FOREGROUND_THRESHOLD
        x, y = _place(occupied, foreground, rng, max_overlap)
        window = (slice(y, y + ITEM_SIZE), slice(x, x + ITEM_SIZE))
        # the canvas is the pixel-wise max of its items, so the mask can name, at every pixel, the item shown there
        shown = foreground & (item >= canvas[window])
        canvas[window] = np.maximum(canvas[window], item)
        mask[window][shown] = labels[index] + 1
        occupied[window] |= foreground
        boxes.append(_tight_box(foreground, x, y))
        offsets.append([x, y])
    return canvas, mask, labels[chosen], np.array(boxes, np.int64), np.array(offsets, np.int64), chosen


def make_mosaics(
    count: int,
    size: int = 56,
    items: Tuple[int, int] = (2, 4),
    split: str = "train",
    seed: int = 0,
    max_overlap: float = 0.1,
    data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Mosaics:
    """`count` canvases of size x size, each with items[0] to items[1] (inclusive) Fashion-MNIST items of the split
    at random positions, at most `max_overlap` of an item's foreground on earlier items where the canvas has room.

    Mosaic i depends only on (seed, i): the same seed gives the same mosaics, and a longer run starts with the
    mosaics of a shorter one. data: (uint8 images [M, 28, 28], labels [M]) to use instead of the split.
    """
    if count < 0 or seed < 0:
        raise InputError(f"count and seed must be at least 0, got {count} and {seed}")
    if size < ITEM_SIZE:
        raise InputError(f"a mosaic of {size} px cannot hold a {ITEM_SIZE} px item: give size >= {ITEM_SIZE}")
    low, high = items
    if not 1 <= low <= high:
        raise InputError(f"items must be (least, most) with 1 <= least <= most, got {tuple(items)}")
    images, labels = data if data is not None else load_fashion_mnist(split)
    if len(images) == 0 or images.shape[1:] != (ITEM_SIZE, ITEM_SIZE):
        raise InputError(f"mosaic items must be [M, {ITEM_SIZE}, {ITEM_SIZE}] images, got {tuple(images.shape)}")
    images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.int64)
    canvases = np.zeros((count, size, size), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    out_labels, boxes, offsets, sources = [], [], [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])  # per mosaic: independent of count
        canvases[i], masks[i], chosen_labels, box, offset, chosen = _one_mosaic(images, labels, size, (low, high),
                                                                               rng, max_overlap)
        out_labels.append(torch.from_numpy(chosen_labels.astype(np.int64)))
        boxes.append(torch.from_numpy(box))
        offsets.append(torch.from_numpy(offset))
        sources.append(torch.from_numpy(chosen.astype(np.int64)))
    return Mosaics(torch.from_numpy(canvases), torch.from_numpy(masks), out_labels, boxes, offsets, sources, split)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def random_homography(height: int, width: int, generator: torch.Generator, rotation: float = 15.0,
                      scale: Tuple[float, float] = (0.85, 1.15), shear: float = 0.1, translation: float = 0.08,
                      perspective: float = 0.15) -> torch.Tensor:
    """A random 3x3 homography (float64) of an image's pixel coordinates (x, y), about the image centre: rotation
    up to `rotation` degrees, isotropic scale in `scale`, shear up to `shear`, translation up to `translation` of
    the side, and a perspective term that changes the homogeneous scale by up to +-perspective/2 at the border."""
    centre = torch.tensor([[1, 0, (width - 1) / 2], [0, 1, (height - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    angle = np.deg2rad(_uniform(generator, -rotation, rotation))
    s = _uniform(generator, *scale)
    k = _uniform(generator, -shear, shear)
    side = max(height, width)
    tx, ty = (_uniform(generator, -translation, translation) * side for _ in range(2))
    px, py = (_uniform(generator, -perspective, perspective) / side for _ in range(2))
    rotate = torch.tensor([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]],
                          dtype=torch.float64)
    affine = torch.tensor([[s, s * k, tx], [0, s, ty], [0, 0, 1]], dtype=torch.float64) @ rotate
    project = torch.tensor([[1, 0, 0], [0, 1, 0], [px, py, 1]], dtype=torch.float64)
    return centre @ project @ affine @ torch.linalg.inv(centre)


def warp_points(homography: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates (x, y) [..., 2] through a 3x3 homography -> [..., 2], in the points' float dtype."""
    dtype = points.dtype if points.is_floating_point() else torch.float32
    flat = points.reshape(-1, 2).to(torch.float64)
    homogeneous = torch.cat([flat, torch.ones(len(flat), 1, dtype=torch.float64)], dim=1) @ homography.T.double()
    return (homogeneous[:, :2] / homogeneous[:, 2:]).reshape(points.shape).to(dtype)


def _sampling_grid(homography: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each output pixel, where it comes from in the source: grid_sample's grid [1, H, W, 2] (align_corners
    =True: pixel centres at integer coordinates, as warp_points has them) and whether that is inside [H, W]."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    source = warp_points(torch.linalg.inv(homography.double()), torch.stack([xs, ys], dim=-1))
    inside = ((source[..., 0] >= -0.5) & (source[..., 0] <= width - 0.5)
              & (source[..., 1] >= -0.5) & (source[..., 1] <= height - 0.5))
    scale = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], dtype=torch.float64)
    return (source * scale - 1).float()[None], inside


def photometric(image: torch.Tensor, generator: torch.Generator, brightness: float = 0.15,
                contrast: Tuple[float, float] = (0.7, 1.3)) -> torch.Tensor:
    """(x - mean) * contrast + mean + brightness * range, clamped to the range (255 for uint8, else 1.0); same
    shape and dtype."""
    top = 255.0 if image.dtype == torch.uint8 else 1.0
    c, b = _uniform(generator, *contrast), _uniform(generator, -brightness, brightness) * top
    pixels = image.double()
    mean = pixels.mean()
    changed = ((pixels - mean) * c + mean + b).clamp(0, top)
    return changed.round().to(torch.uint8) if image.dtype == torch.uint8 else changed.to(image.dtype)


def warped_pair(image: torch.Tensor, mask: Optional[torch.Tensor], generator: torch.Generator
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """A second view of an image for correspondence: a brightness / contrast change (photometric), then a random
    affine + mild perspective warp (random_homography).

    image: uint8 or float in [0, 1], [H, W] or [C, H, W]; mask: integer [H, W] or None. Returns (warped image, same
    shape and dtype, black where the source does not reach; warped mask, nearest neighbour, IGNORE_INDEX where the
    source does not reach; homography float64 [3, 3] mapping source pixels (x, y) to warped ones, for warp_points).
    """
    if image.ndim not in (2, 3):
        raise InputError(f"expected an image [H, W] or [C, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if mask is not None and tuple(mask.shape) != (height, width):
        raise InputError(f"mask {tuple(mask.shape)} does not match the image's {height}x{width}")
    homography = random_homography(height, width, generator)
    grid, inside = _sampling_grid(homography, height, width)
    # photometric change first, so that where the source does not reach stays black
    planes = photometric(image, generator).reshape(1, -1, height, width).float()
    warped = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    warped = warped.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else warped.to(image.dtype)
    warped = warped.reshape(image.shape)
    warped_mask = None
    if mask is not None:
        labels = F.grid_sample(mask.reshape(1, 1, height, width).float(), grid, mode="nearest",
                               padding_mode="zeros", align_corners=True)[0, 0]
        warped_mask = torch.where(inside, labels, torch.tensor(float(IGNORE_INDEX))).to(mask.dtype)
    return warped, warped_mask, homography


__all__ = ["FOREGROUND_THRESHOLD", "IGNORE_INDEX", "MOSAIC_CLASSES", "Mosaics", "make_mosaics", "photometric",
           "random_homography", "warp_points", "warped_pair"]
