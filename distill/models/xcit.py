"""DINO's XCiT backbones: timm's XCiT blocks under the parameter names of the official code, so that DINO's
released files load strictly.

XCiT (El-Nouby et al. 2021, "XCiT: Cross-Covariance Image Transformers") mixes the patch tokens with
cross-covariance attention, local patch interaction and an MLP, then runs class-attention blocks (CaiT, Touvron
et al. 2021) in which only the class token attends. DINO released four XCiTs (facebookresearch/dino hubconf.py
builds facebookresearch/xcit's `xcit_*` models with num_classes=0 and loads the files strictly). Those files use
facebookresearch/xcit's names (xcit.py): `pos_embeder.*` for the Fourier position encoding and one `qkv`
projection per class-attention block. timm's XCiT (timm/models/xcit.py), whose modules are used here, calls the
first `pos_embed.*` and splits the second into `q`, `k`, `v`; `from_timm_layout` converts such a state dict (the
inverse of timm's `checkpoint_filter_fn`).
"""

from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError

Tokens = Dict[str, Optional[torch.Tensor]]
StateDict = Dict[str, torch.Tensor]

# Patch sizes the convolutional patch embedding supports: 3 (p8) or 4 (p16) stride-2 convolutions.
PATCH_SIZES = (8, 16)


class ClassAttention(nn.Module):
    """Class attention: the class token queries every token (itself and the patches); the patch tokens pass
    through unchanged. One `qkv` projection, as in facebookresearch/xcit's ClassAttention (the layout of the
    released weights); only the class token's query is computed, as in timm's ClassAttn."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise InputError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @classmethod
    def from_split(cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, proj: nn.Linear, num_heads: int) -> "ClassAttention":
        """The same attention with timm's separate q, k, v projections merged into one qkv (weights copied)."""
        module = cls(q.in_features, num_heads, qkv_bias=q.bias is not None)
        with torch.no_grad():
            module.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                module.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            module.proj.load_state_dict(proj.state_dict())
        return module

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, heads, N, C / heads]."""
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights of the class token over all tokens: [B, N, C] -> [B, heads, 1, N], rows sum to 1."""
        probs, _ = self._probs_and_values(x)
        return probs

    def _probs_and_values(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dim = x.shape[-1]
        weight, bias = self.qkv.weight, self.qkv.bias
        # Slices of the merged projection: the query of the class token alone, keys and values of every token.
        query = F.linear(x[:, :1], weight[:dim], None if bias is None else bias[:dim])
        keys_values = F.linear(x, weight[dim:], None if bias is None else bias[dim:])
        keys, values = keys_values.chunk(2, dim=-1)
        scores = (self._heads(query) * self.scale) @ self._heads(keys).transpose(-2, -1)
        return scores.softmax(dim=-1), self._heads(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> the class token's update [B, 1, C] (the block keeps the patch tokens)."""
        probs, values = self._probs_and_values(x)
        attended = (probs @ values).transpose(1, 2).reshape(x.shape[0], 1, x.shape[-1])
        return self.proj(attended)


class XCiTBackbone(nn.Module):
    """An XCiT without classifier: `forward` gives the normalised class token [B, D], `forward_features` the
    normalised class and patch tokens, `get_last_self_attention` the class token's attention in the last
    class-attention block.

    Layers and defaults are timm's `Xcit` (timm/models/xcit.py); eta is the LayerScale initial value, tokens_norm
    normalises every token (not only the class token) before the MLP of the class-attention blocks, as the released
    small and medium models do. There is no get_intermediate_layers: the class token only joins in the
    class-attention stage, and DINO evaluates XCiTs on the final class token (eval_linear.py calls model(x) for
    every non-ViT architecture).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eta: float = 1.0,
        tokens_norm: bool = True,
        cls_attn_layers: int = 2,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        from timm.models.xcit import Xcit

        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        _check_arguments(img_h, img_w, patch_size, embed_dim, num_heads, depth, cls_attn_layers)
        self.config = dict(
            img_size=(img_h, img_w), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, eta=eta, tokens_norm=tokens_norm,
            cls_attn_layers=cls_attn_layers, drop_path_rate=drop_path_rate, norm_eps=norm_eps,
        )
        net = Xcit(
            img_size=(img_h, img_w), patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps), cls_attn_layers=cls_attn_layers, eta=eta,
            tokens_norm=tokens_norm,
        )
        # timm's modules under the official attribute names (registration order = the official key order).
        self.patch_embed = net.patch_embed
        self.cls_token = net.cls_token
        self.blocks = net.blocks
        self.cls_attn_blocks = net.cls_attn_blocks
        for block in self.cls_attn_blocks:
            timm_attn = block.attn
            block.attn = ClassAttention.from_split(timm_attn.q, timm_attn.k, timm_attn.v, timm_attn.proj, num_heads)
        self.norm = net.norm
        self.pos_embeder = net.pos_embed

        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.num_classes = 0
        self.num_prefix_tokens = 1  # the class token; no distillation or register tokens

    def adapt_state_dict(self, state: StateDict) -> Tuple[StateDict, List[str]]:
        """A state dict in timm's XCiT layout renamed to this model's (official) one; see from_timm_layout."""
        return from_timm_layout(state)

    def no_weight_decay(self) -> set:
        """The class token and the position encoding's projection, as timm's Xcit; each XCA's temperature is
        listed by the XCA module itself."""
        return {"cls_token", "pos_embeder.token_projection.weight", "pos_embeder.token_projection.bias"}

    # ------------------------------------------------------------------ stages

    def _patch_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images [B, C, H, W] -> patch tokens with the position encoding added [B, h * w, D], and (h, w)."""
        channels = self.config["in_chans"]
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"expected [batch, {channels}, height, width] images, got {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise InputError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the patch size "
                             f"{self.patch_size}: resize or crop the images")
        tokens, (height, width) = self.patch_embed(x)
        # [B, D, h, w] -> [B, h * w, D], the flattening order of the patch tokens
        position = self.pos_embeder(x.shape[0], height, width).flatten(2).transpose(1, 2)
        return tokens + position.to(tokens.dtype), (height, width)

    def _mixed_patches(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch tokens after the XCA blocks [B, N, D], and the grid (h, w)."""
        tokens, (height, width) = self._patch_tokens(x)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        return tokens, (height, width)

    def _with_class_token(self, patches: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        """[B, N, D] patches -> [B, 1 + N, D]: the class token prepended, through the given class-attention blocks."""
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        for block in blocks:
            tokens = block(tokens)
        return tokens

    # ------------------------------------------------------------------ public forward passes

    def forward_features(
        self,
        x: Union[torch.Tensor, List[torch.Tensor]],
        masks: Optional[Union[torch.Tensor, List[Optional[torch.Tensor]]]] = None,
    ) -> Union[Tokens, List[Tokens]]:
        """Normalised class token [B, D] and patch tokens [B, h * w, D], the pre-norm sequence [B, 1 + h * w, D];
        a list of batches gives a list of dicts."""
        if isinstance(x, (list, tuple)):
            if masks is not None and any(m is not None for m in masks):
                raise InputError("XCiT backbones have no mask token: masked-image objectives (iBOT, DINOv2) need a "
                                 "ViT backbone")
            return [self.forward_features(xi) for xi in x]
        if masks is not None:
            raise InputError("XCiT backbones have no mask token: masked-image objectives (iBOT, DINOv2) need a ViT "
                             "backbone")
        patches, _ = self._mixed_patches(x)
        prenorm = self._with_class_token(patches, self.cls_attn_blocks)
        normed = self.norm(prenorm)
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:1],
            "x_norm_patchtokens": normed[:, 1:],
            "x_prenorm": prenorm,
            "masks": None,
        }

    def forward(self, x: Union[torch.Tensor, List[torch.Tensor]]):
        """Class-token embedding [B, D] (a list of batches gives a list)."""
        if isinstance(x, (list, tuple)):
            return [self.forward(xi) for xi in x]
        patches, _ = self._mixed_patches(x)
        tokens = self._with_class_token(patches, self.cls_attn_blocks)
        # LayerNorm works token by token: normalising the class token alone is exact.
        return self.norm(tokens[:, 0])

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the class token in the last class-attention block: [B, heads, 1, 1 + h * w] over
        (class token, patches); rows sum to 1. Class attention has no other query, hence one row."""
        patches, _ = self._mixed_patches(x)
        tokens = self._with_class_token(patches, self.cls_attn_blocks[:-1])
        last = self.cls_attn_blocks[-1]
        return last.attn.attention_probs(last.norm1(tokens))


def _check_arguments(img_h: int, img_w: int, patch_size: int, embed_dim: int, num_heads: int, depth: int,
                     cls_attn_layers: int) -> None:
    if patch_size not in PATCH_SIZES:
        raise InputError(f"XCiT patch_size {patch_size} unsupported: its convolutional patch embedding takes "
                         f"{' or '.join(map(str, PATCH_SIZES))}")
    if img_h % patch_size or img_w % patch_size:
        raise InputError(f"img_size {img_h}x{img_w} is not a multiple of patch_size {patch_size}")
    if embed_dim % num_heads or embed_dim % 8:
        raise InputError(f"embed_dim {embed_dim} must be a multiple of 8 and of num_heads {num_heads}")
    if depth < 1 or cls_attn_layers < 1:
        raise InputError("depth and cls_attn_layers must be >= 1 (the class token joins in the class-attention "
                         "blocks)")


def from_timm_layout(state: StateDict) -> Tuple[StateDict, List[str]]:
    """A state dict of timm's XCiT in the official layout (pos_embed.* -> pos_embeder.*, q/k/v of the
    class-attention blocks merged into qkv), and what was changed; official files come back as they are."""
    state = dict(state)
    notes: List[str] = []
    renamed = [k for k in state if k.startswith("pos_embed.")]
    for key in renamed:
        state["pos_embeder." + key[len("pos_embed."):]] = state.pop(key)
    split = sorted({k.rsplit(".attn.q.", 1)[0] for k in state if k.startswith("cls_attn_blocks.") and ".attn.q." in k})
    for block in split:
        for kind in ("weight", "bias"):
            names = [f"{block}.attn.{name}.{kind}" for name in "qkv"]
            if all(name in state for name in names):  # an incomplete triple stays, for the mismatch report to name
                state[f"{block}.attn.qkv.{kind}"] = torch.cat([state.pop(name) for name in names])
    if renamed or split:
        notes.append("converted timm's XCiT layout (pos_embed -> pos_embeder, q/k/v -> qkv)")
    return state, notes
