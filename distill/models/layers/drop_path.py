"""Stochastic depth: drop a whole residual branch per sample, rescaling the kept ones."""

import torch
from torch import nn


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, in the same order and shape as the reference implementations,
        # so that a fixed seed drops the same samples here and there.
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
