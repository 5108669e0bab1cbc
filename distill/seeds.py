"""Randomness that resumes: generators derived from integers (seed, epoch, index, ...), and a block that runs with
the global generators seeded, then puts them back.

Every random draw of a run is a function of such integers, so a resumed run repeats the draws of the uninterrupted
one, whatever the number of loader workers or ranks.
"""

import contextlib
import enum
import random
from typing import Iterator

import numpy as np
import torch


class Stream(enum.IntEnum):
    """The last key of a derived generator: keeps streams apart that share the other keys (the same seed and epoch
    give unrelated draws for a batch's views, an image's views and a step's masks)."""

    BATCH_VIEWS = 1  # the views of one in-memory batch
    IMAGE_VIEWS = 2  # the views of one decoded file
    MASKS = 3  # DINOv2's patch masks at a step


def derived_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (seed, epoch, index, ...), well mixed."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from a tuple of integers (for libraries that draw from NumPy's global generator)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Python, NumPy and PyTorch global generators seeded for a block, then restored: code that draws from them
    (timm's augmentations, its mixup) gives the same draws for the same seed, and the run's own streams are
    untouched."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # the CPU's only: CUDA's streams are not restored below
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
