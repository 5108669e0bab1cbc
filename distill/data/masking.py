"""DINOv2's masks for iBOT: block-wise random masks, on half of the global images, with mask ratios spread
evenly over a range across the batch.

Every draw comes from a torch generator, so a step's masks are a function of (seed, step) and a resumed run
masks what the uninterrupted one would have.
"""

import math
from typing import Optional, Sequence, Tuple

import torch


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def block_mask(height: int, width: int, num_masked: int, generator: Optional[torch.Generator] = None,
               min_block: int = 4, max_block: Optional[int] = None,
               aspect: Tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """A [height, width] boolean mask of about `num_masked` patches made of random rectangles.

    Each rectangle has an area drawn between min_block and what is left (at most max_block) and a log-uniform
    aspect ratio, is strictly smaller than the grid, and must add at least one new patch without passing the
    budget; after ten failed draws in a row the mask stays as it is (it may hold fewer patches than asked).
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    max_block = max_block or num_masked
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = _uniform(min_block, budget, generator)
            ratio = math.exp(_uniform(log_low, log_high, generator))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (0 < h < height and 0 < w < width):
                continue
            top, left = _randint(0, height - h, generator), _randint(0, width - w, generator)
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def batch_masks(n_images: int, grid: Tuple[int, int], ratio: Sequence[float] = (0.1, 0.5),
                probability: float = 0.5, generator: Optional[torch.Generator] = None,
                max_ratio: float = 0.5) -> torch.Tensor:
    """[n_images, H * W] boolean masks: int(n_images * probability) images masked, the i-th of them with a ratio
    drawn in the i-th of equal bins of `ratio`, the others unmasked; the rows are then shuffled."""
    height, width = grid
    tokens = height * width
    n_masked = int(n_images * probability)
    edges = torch.linspace(float(ratio[0]), float(ratio[1]), n_masked + 1).tolist()
    masks = []
    for i in range(n_masked):
        target = int(tokens * _uniform(edges[i], edges[i + 1], generator))
        masks.append(block_mask(height, width, target, generator, max_block=int(max_ratio * tokens)))
    masks += [torch.zeros(height, width, dtype=torch.bool)] * (n_images - n_masked)
    order = torch.randperm(n_images, generator=generator)
    return torch.stack(masks)[order].flatten(1)


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weight of each masked token: 1 / (number of masked tokens of its image), in the order of masks[masks]."""
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image[:, None].expand_as(masks)[masks]
