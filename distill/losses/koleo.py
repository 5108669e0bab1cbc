"""KoLeo regulariser (Sablayrolles et al. 2019, as used by DINOv2): spreads features by penalising each one's
distance to its nearest neighbour in the batch."""

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError


class KoLeoLoss(nn.Module):
    """loss = -mean_i log(||x_i - x_nn(i)|| + eps) on L2-normalised features (eps 1e-8), where nn(i) maximises the
    dot product with x_i over the other samples. Computed in fp32."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise InputError(f"KoLeo needs a batch of at least 2 feature vectors, got shape {tuple(features.shape)}: "
                             "raise data.batch_size (or set objective.koleo_loss_weight=0)")
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
            neighbours = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[neighbours], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
