"""DINOv2's masks for iBOT: block-wise random masks, on half of the global images, with mask ratios spread
evenly over a range across the batch.

Every draw comes from a torch generator, so a step's masks are a function of (seed, step) and a resumed run
masks what the uninterrupted one would have.
"""

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

MIN_BLOCK = 4  # patches in a block at least
ASPECT = (0.3, 1 / 0.3)  # a block's height / width, log-uniform in this range


class Uniforms:
    """Uniform numbers in [0, 1) from a torch generator, drawn from it `block` at a time and handed out one by one
    as Python floats: a mask's tries need a few numbers each, and a torch call per number (several microseconds)
    cost ten times the rest of the work (a batch of 64 masks took 10 ms, 7% of the CPU demo's step)."""

    def __init__(self, generator: Optional[torch.Generator], block: int = 1024) -> None:
        self.generator, self.block = generator, block
        self.values: List[float] = []
        self.position = 0

    def __call__(self) -> float:
        if self.position == len(self.values):
            self.values = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()
            self.position = 0
        self.position += 1
        return self.values[self.position - 1]

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self()

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high], both included."""
        return low + min(int(self() * (high - low + 1)), high - low)


def _block_mask(height: int, width: int, num_masked: int, draws: Uniforms, min_block: int,
                max_block: Optional[int], aspect: Tuple[float, float]) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    max_block = max_block or num_masked
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = draws.uniform(min_block, budget)
            ratio = math.exp(draws.uniform(log_low, log_high))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (0 < h < height and 0 < w < width):
                continue
            top, left = draws.integer(0, height - h), draws.integer(0, width - w)
            region = mask[top : top + h, left : left + w]
            new = h * w - int(np.count_nonzero(region))
            if 0 < new <= budget:
                region[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def block_mask(height: int, width: int, num_masked: int, generator: Optional[torch.Generator] = None,
               min_block: int = MIN_BLOCK, max_block: Optional[int] = None,
               aspect: Tuple[float, float] = ASPECT) -> torch.Tensor:
    """A [height, width] boolean mask of about `num_masked` patches made of random rectangles.

    Each rectangle has an area drawn between min_block and what is left (at most max_block) and a log-uniform
    aspect ratio, is strictly smaller than the grid, and must add at least one new patch without passing the
    budget; after ten failed draws in a row the mask stays as it is (it may hold fewer patches than asked).
    """
    draws = Uniforms(generator)
    return torch.from_numpy(_block_mask(height, width, num_masked, draws, min_block, max_block, aspect))


def batch_masks(n_images: int, grid: Tuple[int, int], ratio: Sequence[float] = (0.1, 0.5),
                probability: float = 0.5, generator: Optional[torch.Generator] = None,
                max_ratio: float = 0.5) -> torch.Tensor:
    """[n_images, H * W] boolean masks: int(n_images * probability) images masked, the i-th of them with a ratio
    drawn in the i-th of equal bins of `ratio`, the others unmasked; the rows are then shuffled."""
    height, width = grid
    tokens = height * width
    n_masked = int(n_images * probability)
    edges = torch.linspace(float(ratio[0]), float(ratio[1]), n_masked + 1).tolist()
    draws = Uniforms(generator)
    masks = np.zeros((n_images, height, width), dtype=bool)
    max_block = int(max_ratio * tokens)
    for i in range(n_masked):
        target = int(tokens * draws.uniform(edges[i], edges[i + 1]))
        masks[i] = _block_mask(height, width, target, draws, MIN_BLOCK, max_block, ASPECT)
    order = torch.randperm(n_images, generator=generator)
    return torch.from_numpy(masks.reshape(n_images, tokens))[order]


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weight of each masked token: 1 / (number of masked tokens of its image), in the order of masks[masks]."""
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image[:, None].expand_as(masks)[masks]
