"""One Vision Transformer for every paradigm: class, distillation, register and patch tokens.

Parameter names follow the official DINO / DeiT / DINOv2 checkpoints, so their files load after at most a
renaming of prefixes. Token order: class token, distillation token (DeiT), register tokens (DINOv2), patches.
The class and distillation tokens carry a position embedding; register tokens do not (they are inserted after
the position embedding is added, as in DINOv2).
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from distill.errors import InputError
from distill.models.layers import Block, PatchEmbed, resize_pos_embed
from distill.models.layers.pos_embed import resize_pos_embed_traceable
from distill.models.layers.attention import PackedLayout

Tokens = Dict[str, Optional[torch.Tensor]]


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_layer: str = "mlp",
        layerscale_init: Optional[float] = None,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        drop_path_mode: str = "mask",
        num_register_tokens: int = 0,
        distilled: bool = False,
        mask_token: bool = True,
        num_classes: int = 0,
        interpolate_offset: float = 0.0,
        interpolate_antialias: bool = True,
        attn_backend: str = "sdpa",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        img_h, img_w = _pair(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise InputError(f"img_size {img_h}x{img_w} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0 or depth < 1 or num_classes < 0:
            raise InputError("depth must be >= 1, num_register_tokens and num_classes >= 0")
        if embed_dim % num_heads:
            raise InputError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}: each head takes an "
                             "equal share of the width")
        self.config = dict(
            img_size=(img_h, img_w), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ffn_layer=ffn_layer,
            layerscale_init=layerscale_init, drop_path_rate=drop_path_rate, drop_path_uniform=drop_path_uniform,
            drop_path_mode=drop_path_mode, num_register_tokens=num_register_tokens, distilled=distilled, mask_token=mask_token,
            num_classes=num_classes, interpolate_offset=interpolate_offset,
            interpolate_antialias=interpolate_antialias, attn_backend=attn_backend, norm_eps=norm_eps,
        )
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.pos_grid = (img_h // patch_size, img_w // patch_size)
        # Tokens that carry a position embedding (class, distillation), then all tokens before the patches.
        self.num_pos_prefix_tokens = 2 if distilled else 1
        self.num_prefix_tokens = self.num_pos_prefix_tokens + num_register_tokens

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        num_patches = self.pos_grid[0] * self.pos_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_pos_prefix_tokens + num_patches, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            # Linear decay from 0 at the first block to drop_path_rate at the last (the usual rule).
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ffn_layer=ffn_layer,
                layerscale_init=layerscale_init, drop_path=rate, norm_eps=norm_eps, attn_backend=attn_backend,
                drop_path_mode=drop_path_mode,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes and distilled else None
        self.init_weights()

    # ------------------------------------------------------------------ set-up

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set:
        """Parameter names that should get no weight decay besides biases and norms (as in timm and DINOv2)."""
        names = {"pos_embed", "cls_token", "dist_token", "register_tokens", "mask_token"}
        return {name for name, _ in self.named_parameters() if name in names}

    # ------------------------------------------------------------------ tokens

    def interpolate_pos_encoding(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Position embedding [1, prefix + gh*gw, D] for a patch grid of gh x gw, resized on the fly."""
        n = self.num_pos_prefix_tokens
        if torch.compiler.is_exporting():
            # torch.export / ONNX: the grid is symbolic, so the resize is built in the graph, without a branch on it
            patch_pos = resize_pos_embed_traceable(
                self.pos_embed[:, n:], self.pos_grid, grid, self.interpolate_offset, self.interpolate_antialias
            )
            return torch.cat((self.pos_embed[:, :n], patch_pos), dim=1)
        if tuple(grid) == self.pos_grid:
            return self.pos_embed
        patch_pos = resize_pos_embed(
            self.pos_embed[:, n:], self.pos_grid, grid, self.interpolate_offset, self.interpolate_antialias
        )
        return torch.cat((self.pos_embed[:, :n], patch_pos), dim=1)

    def _check_masks(self, masks: torch.Tensor, batch: int, grid: Tuple[int, int]) -> torch.Tensor:
        if self.mask_token is None:
            raise InputError("this model has no mask token: build it with mask_token=True to pass masks")
        num_patches = grid[0] * grid[1]
        if masks.dtype != torch.bool or masks.shape[0] != batch or masks[0].numel() != num_patches:
            raise InputError(
                f"masks must be a boolean tensor [{batch}, {num_patches}] (or [{batch}, {grid[0]}, {grid[1]}]), "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )
        return masks.reshape(batch, num_patches)

    def prepare_tokens(
        self, x: torch.Tensor, masks: Optional[torch.Tensor] = None, stride: Optional[int] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images [B, C, H, W] -> tokens [B, prefix + H/p * W/p, D]; masked patches become the mask token.

        stride < patch size: overlapping patches, the position embedding resized to their denser grid (the
        dense-descriptor trick of Amir et al. 2021, "Deep ViT Features as Dense Visual Descriptors")."""
        tokens = self.patch_embed(x, stride)
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        grid = self.patch_embed.grid(height, width, stride)
        if masks is not None:
            masks = self._check_masks(masks, batch, grid)
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        tokens = torch.cat(prefix + [tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(grid).to(tokens.dtype)
        if self.register_tokens is not None:
            n = self.num_pos_prefix_tokens
            registers = self.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :n], registers, tokens[:, n:]), dim=1)
        return tokens, masks

    def _run_blocks(self, tokens: torch.Tensor, packed: Optional[PackedLayout] = None) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens) if packed is None else block(tokens, packed)
        return tokens

    def _split(self, prenorm: torch.Tensor, masks: Optional[torch.Tensor]) -> Tokens:
        normed = self.norm(prenorm)
        n = self.num_pos_prefix_tokens
        out = {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, n : self.num_prefix_tokens],
            "x_norm_patchtokens": normed[:, self.num_prefix_tokens :],
            "x_prenorm": prenorm,
            "masks": masks,
        }
        if self.dist_token is not None:
            out["x_norm_disttoken"] = normed[:, 1]
        return out

    # ------------------------------------------------------------------ public forward passes

    def forward_features(
        self,
        x: Union[torch.Tensor, List[torch.Tensor]],
        masks: Optional[Union[torch.Tensor, List[Optional[torch.Tensor]]]] = None,
    ) -> Union[Tokens, List[Tokens]]:
        """Normalised class / distillation / register / patch tokens, the pre-norm sequence and the masks.

        Takes one batch [B, C, H, W], or a list of batches of different sizes (the crops of multi-crop
        training) with an optional list of masks, and then returns a list of dicts.
        """
        if isinstance(x, (list, tuple)):
            masks_list = masks if masks is not None else [None] * len(x)
            if len(masks_list) != len(x):
                raise InputError(f"got {len(x)} crop batches but {len(masks_list)} masks")
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks_list)]
        tokens, masks = self.prepare_tokens(x, masks)
        return self._split(self._run_blocks(tokens), masks)

    def forward_features_packed(
        self, crops: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[torch.Tensor]]] = None
    ) -> List[Tokens]:
        """forward_features over a list of crop batches in one pass: row b holds the token sequences of image b's
        crops one after another, attending only within each crop. Same outputs as separate calls (the crops
        must share the batch size); fewer, larger matrix products."""
        if not crops or len({c.shape[0] for c in crops}) != 1:
            raise InputError("packed crops must be a non-empty list of batches of the same size")
        masks = list(masks) if masks is not None else [None] * len(crops)
        prepared = [self.prepare_tokens(x, m) for x, m in zip(crops, masks)]
        lengths = [tokens.shape[1] for tokens, _ in prepared]
        packed = self._run_blocks(torch.cat([tokens for tokens, _ in prepared], dim=1), PackedLayout(lengths))
        return [self._split(chunk, m) for chunk, (_, m) in zip(packed.split(lengths, dim=1), prepared)]

    def forward_head(self, features: Tokens) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Class-token embedding for a backbone; logits for a classifier.

        A distilled classifier returns (class logits, distillation logits) in training mode and their mean in
        evaluation mode, as the official DeiT models do.
        """
        cls_logits = self.head(features["x_norm_clstoken"])
        if self.head_dist is None:
            return cls_logits
        dist_logits = self.head_dist(features["x_norm_disttoken"])
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def forward(self, x: Union[torch.Tensor, List[torch.Tensor]]):
        if isinstance(x, (list, tuple)):
            return [self.forward(xi) for xi in x]
        tokens, _ = self.prepare_tokens(x)
        tokens = self._run_blocks(tokens)
        # Only the class (and distillation) tokens are read here: normalising them alone is exact, as LayerNorm
        # works token by token, and saves the norm of every patch token.
        normed = self.norm(tokens[:, : self.num_pos_prefix_tokens])
        features = {"x_norm_clstoken": normed[:, 0]}
        if self.dist_token is not None:
            features["x_norm_disttoken"] = normed[:, 1]
        return self.forward_head(features)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last n blocks (or of the blocks whose indices are listed), as in DINOv2.

        Each output is [B, N, D], or [B, D, H/p, W/p] with reshape=True; with return_class_token=True each
        entry is a pair (patch tokens, class token [B, D]).
        """
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise InputError(f"n={n} blocks asked for, the model has {depth}")
            wanted = list(range(depth - n, depth))
        else:
            wanted = [i + depth if i < 0 else i for i in n]
            if not wanted or any(not 0 <= i < depth for i in wanted):
                raise InputError(f"block indices {list(n)} out of range for a model of depth {depth}")
        tokens, _ = self.prepare_tokens(x)
        collected = {}
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = block(tokens)
            if index in wanted:
                collected[index] = tokens
        outputs = [self.norm(collected[i]) if norm else collected[i] for i in wanted]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, self.num_prefix_tokens :] for out in outputs]
        if reshape:
            batch, height, width = x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = [p.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, heads, N, N] of the last block (token order as in prepare_tokens)."""
        tokens, _ = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(tokens))
