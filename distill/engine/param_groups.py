"""Parameter groups: no weight decay for biases and 1-D parameters (norms, LayerScale), as in DINO."""

from typing import Dict, Iterable, List, Set

from torch import nn


def param_groups(module: nn.Module, exclude_tokens: bool = False) -> List[Dict]:
    """[{"params": decayed}, {"params": not decayed, "apply_wd": False}] over the trainable parameters.

    exclude_tokens additionally spares the names listed by the backbones' no_weight_decay() (position
    embedding, class / distillation / register / mask tokens), timm's convention; DINO decays them.
    """
    token_names: Set[str] = set()
    if exclude_tokens:
        for prefix, child in module.named_modules():
            if hasattr(child, "no_weight_decay"):
                token_names |= {f"{prefix}.{n}" if prefix else n for n in child.no_weight_decay()}
    decayed, not_decayed = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1 or name in token_names:
            not_decayed.append(param)
        else:
            decayed.append(param)
    groups = [{"params": decayed, "apply_wd": True}, {"params": not_decayed, "apply_wd": False}]
    return [g for g in groups if g["params"]]


def names_without_decay(module: nn.Module, groups: Iterable[Dict]) -> List[str]:
    """Names of the parameters in groups that get no weight decay (for logs and tests)."""
    ids = {id(p) for g in groups if not g["apply_wd"] for p in g["params"]}
    return [name for name, p in module.named_parameters() if id(p) in ids]
