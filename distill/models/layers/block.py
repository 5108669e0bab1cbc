"""One pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each with drop path."""

from typing import Optional

import torch
from torch import nn

from distill.models.layers.attention import Attention
from distill.models.layers.drop_path import DropPath
from distill.models.layers.layer_scale import LayerScale
from distill.models.layers.mlp import Mlp, SwiGLU, swiglu_hidden_features

FFN_LAYERS = ("mlp", "swiglu")


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
    ) -> None:
        super().__init__()
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
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}: choose one of {', '.join(FFN_LAYERS)}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
