"""Parameter groups: no weight decay for biases and 1-D parameters (norms, LayerScale), as in DINO; optional
layer-wise learning-rate decay and a patch-embedding learning-rate multiplier, as in DINOv2."""

import re
from typing import Dict, Iterable, List, Set

from torch import nn

EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "dist_token", "register_tokens")


def _depth(module: nn.Module) -> int:
    depths = [len(child.blocks) for child in module.modules() if isinstance(getattr(child, "blocks", None), nn.ModuleList)]
    return max(depths, default=0)


def lr_multiplier(name: str, num_layers: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> float:
    """DINOv2's rule: layer id 0 for embeddings and tokens, i + 1 for block i, num_layers + 1 for the rest (final
    norm, heads); multiplier layer_decay ** (num_layers + 1 - id), times patch_embed_lr_mult for the patch
    embedding."""
    layer_id = num_layers + 1
    block = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if block:
        layer_id = int(block.group(1)) + 1
    elif any(re.search(rf"(?:^|\.){token}(?:\.|$)", name) for token in EMBEDDING_NAMES):
        layer_id = 0
    multiplier = layer_decay ** (num_layers + 1 - layer_id)
    if re.search(r"(?:^|\.)patch_embed\.", name):
        multiplier *= patch_embed_lr_mult
    return multiplier


def param_groups(module: nn.Module, exclude_tokens: bool = False, layer_decay: float = 1.0,
                 patch_embed_lr_mult: float = 1.0) -> List[Dict]:
    """Groups over the trainable parameters: {"params", "apply_wd", "lr_multiplier"}, one per combination.

    exclude_tokens additionally spares the names listed by the backbones' no_weight_decay() (position
    embedding, class / distillation / register / mask tokens), timm's convention; DINO decays them.
    layer_decay < 1 and patch_embed_lr_mult != 1 give each parameter DINOv2's learning-rate multiplier.
    """
    token_names: Set[str] = set()
    if exclude_tokens:
        for prefix, child in module.named_modules():
            if hasattr(child, "no_weight_decay"):
                token_names |= {f"{prefix}.{n}" if prefix else n for n in child.no_weight_decay()}
    num_layers = _depth(module)
    grouped: Dict[tuple, List] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        apply_wd = not (name.endswith(".bias") or param.ndim <= 1 or name in token_names)
        multiplier = 1.0
        if layer_decay != 1.0 or patch_embed_lr_mult != 1.0:
            multiplier = lr_multiplier(name, num_layers, layer_decay, patch_embed_lr_mult)
        grouped.setdefault((apply_wd, multiplier), []).append(param)
    order = sorted(grouped, key=lambda key: (not key[0], -key[1]))
    return [{"params": grouped[key], "apply_wd": key[0], "lr_multiplier": key[1]} for key in order]


def names_without_decay(module: nn.Module, groups: Iterable[Dict]) -> List[str]:
    """Names of the parameters in groups that get no weight decay (for logs and tests)."""
    ids = {id(p) for g in groups if not g["apply_wd"] for p in g["params"]}
    return [name for name, p in module.named_parameters() if id(p) in ids]
