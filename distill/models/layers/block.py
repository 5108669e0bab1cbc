"""One pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each with drop path."""

from typing import Optional

import torch
from torch import nn

from distill.errors import InputError
from distill.models.layers.attention import Attention, PackedLayout
from distill.models.layers.drop_path import DropPath
from distill.models.layers.layer_scale import LayerScale
from distill.models.layers.mlp import Mlp, SwiGLU, swiglu_hidden_features

FFN_LAYERS = ("mlp", "swiglu")
DROP_PATH_MODES = ("mask", "subset")


def residual_on_subset(x: torch.Tensor, branch, drop_prob: float) -> torch.Tensor:
    """Stochastic depth that computes the branch only for the kept samples (DINOv2's way): a random subset of
    max(1, int(B * (1 - p))) samples gets x + branch(x) * B / kept, the others x. Same expectation as per-sample
    dropping, a fixed kept count, and a (1 - p) share of the branch's compute."""
    batch = x.shape[0]
    kept = max(int(batch * (1 - drop_prob)), 1)
    index = torch.randperm(batch, device=x.device)[:kept]
    residual = branch(x[index])
    return torch.index_add(x, 0, index, residual.to(x.dtype), alpha=batch / kept)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_layer: str = "mlp",
        layerscale_init: Optional[float] = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_backend: str = "sdpa",
        drop_path_mode: str = "mask",
    ) -> None:
        super().__init__()
        if drop_path_mode not in DROP_PATH_MODES:
            raise InputError(f"drop_path_mode {drop_path_mode!r}: choose one of {', '.join(DROP_PATH_MODES)}")
        self.drop_prob, self.drop_path_mode = drop_path, drop_path_mode
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        elif ffn_layer == "swiglu":
            self.mlp = SwiGLU(dim, swiglu_hidden_features(dim, mlp_ratio))
        else:
            raise InputError(f"unknown ffn_layer {ffn_layer!r}: choose one of {', '.join(FFN_LAYERS)}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, packed: Optional[PackedLayout] = None) -> torch.Tensor:
        if self.training and self.drop_prob > 0 and self.drop_path_mode == "subset":
            x = residual_on_subset(x, lambda t: self.ls1(self.attn(self.norm1(t), packed)), self.drop_prob)
            return residual_on_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))), self.drop_prob)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), packed)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
