"""Building blocks of the Vision Transformer, one small file each."""

from distill.models.layers.attention import Attention, xformers_available
from distill.models.layers.block import Block
from distill.models.layers.drop_path import DropPath
from distill.models.layers.layer_scale import LayerScale
from distill.models.layers.mlp import Mlp, SwiGLU, swiglu_hidden_features
from distill.models.layers.patch_embed import PatchEmbed
from distill.models.layers.pos_embed import resize_pos_embed

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLU",
    "resize_pos_embed",
    "swiglu_hidden_features",
    "xformers_available",
]
