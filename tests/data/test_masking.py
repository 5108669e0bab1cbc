"""DINOv2's block masks: statistics per batch, shapes, and determinism."""

import torch

from distill.data.masking import Uniforms, batch_masks, block_mask


def test_half_the_images_are_masked_with_ratios_spread_over_the_range():
    generator = torch.Generator().manual_seed(0)
    masks = batch_masks(32, (14, 14), ratio=(0.1, 0.5), probability=0.5, generator=generator)
    assert masks.shape == (32, 196) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    masked = counts[counts > 0].sort().values
    assert len(masked) == 16  # int(32 * 0.5) images, the rest untouched
    edges = torch.linspace(0.1, 0.5, 17)
    # the i-th smallest lies at most in the i-th bin (blocks may fall short, never over)
    assert all(c <= int(196 * edges[i + 1]) for i, c in enumerate(masked.tolist()))
    assert masked.float().mean() / 196 > 0.2  # about the middle of 0.1-0.5 on average
    assert masked[-1] > 3 * masked[0]  # spread, not all alike


def test_masks_are_blocks_not_scattered_tokens():
    mask = block_mask(14, 14, 40, torch.Generator().manual_seed(3))
    assert 20 <= int(mask.sum()) <= 40
    # a block mask has far fewer masked/unmasked edges than a random one with as many tokens
    edges = lambda m: int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())  # noqa: E731
    scattered = torch.zeros(196, dtype=torch.bool)
    scattered[torch.randperm(196, generator=torch.Generator().manual_seed(0))[: int(mask.sum())]] = True
    assert edges(mask) < edges(scattered.view(14, 14)) / 2


def test_same_generator_state_same_masks():
    a = batch_masks(8, (4, 4), generator=torch.Generator().manual_seed(5))
    b = batch_masks(8, (4, 4), generator=torch.Generator().manual_seed(5))
    c = batch_masks(8, (4, 4), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((a.sum(dim=1) > 0).sum()) == 4


def test_pooled_draws_are_the_generators_numbers_in_order():
    """Masks take their numbers from the generator a block at a time; across refills they are the same numbers,
    in the same order, as drawing them all at once."""
    draws = Uniforms(torch.Generator().manual_seed(7), block=100)
    expected = torch.rand(250, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()
    assert [draws() for _ in range(250)] == expected


def test_pooled_integers_cover_both_ends_evenly():
    draws = Uniforms(torch.Generator().manual_seed(0))
    values = torch.tensor([draws.integer(2, 4) for _ in range(6000)])
    counts = torch.bincount(values, minlength=6)
    assert counts[:2].sum() == 0 and counts[5] == 0  # only 2, 3 and 4
    assert all(abs(int(c) - 2000) < 150 for c in counts[2:5])  # about a third each (sd ~37)
