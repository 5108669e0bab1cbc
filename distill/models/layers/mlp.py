"""Feed-forward layers: the classic GELU MLP and DINOv2's SwiGLU."""

import torch
import torch.nn.functional as F
from torch import nn


def _needs_autograd(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, the feed-forward of DINO, DeiT and DINOv2 ViT-S/B/L."""

    def __init__(self, dim: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if _needs_autograd(hidden):
            hidden = self.act(hidden)
        else:
            # Without autograd the activation can overwrite fc1's output: on a CPU this skips allocating (and
            # page-faulting in) a second [tokens, 4*dim] buffer, which costs more than the GELU itself.
            hidden = torch.ops.aten.gelu_(hidden)
        return self.fc2(hidden)


def swiglu_hidden_features(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: two thirds of the MLP width, rounded up to a multiple of 8 (4096 for ViT-g)."""
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2) then W3, with W1 and W2 packed in one `w12` matrix as in DINOv2's checkpoints."""

    def __init__(self, dim: int, hidden_features: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate, inplace=not _needs_autograd(gate)) * value)
