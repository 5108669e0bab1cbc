"""Projection heads. Parameter names follow DINO's checkpoints (mlp.{0,2,4}, last_layer.weight_g/_v)."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with W = g * v / ||v|| per output row, stored as `weight_g` [out, 1] and
    `weight_v` [out, in] like torch.nn.utils.weight_norm. With fix_norm, g stays 1 and is not trained."""

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as DINO leaves it
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    """MLP (in -> hidden -> ... -> bottleneck, GELU), L2 normalisation, weight-normalised prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for index in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, bottleneck_dim if index == nlayers - 2 else hidden_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> prototype scores [N, out_dim], always float32.

        The prototype scores are cosines divided by temperatures of 0.04-0.1: in bf16 (8-bit mantissa) they
        would be quantised to ~0.004, coarser than the small differences between samples that the teacher's
        sharpening has to amplify early in training. The normalisation and the last layer (a small share of
        the compute) therefore run in float32 under any autocast.
        """
        x = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(F.normalize(x.float(), dim=-1, p=2))
