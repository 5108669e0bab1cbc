"""What a state dict says about the network it came from, and what to tell a user when it does not fit a model.

A file that does not load gets one message: the keys missing, unexpected and of other shapes (block indices
folded, so that the distinctive ones stay visible), the architecture the file holds, and the registered name it
looks like.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from distill.models.registry import get_spec, list_backbones

StateDict = Dict[str, torch.Tensor]


def perfect_square_root(n: int) -> Optional[int]:
    """The side of a square grid of n tokens, or None when n is not a square."""
    root = int(round(n**0.5))
    return root if root * root == n else None


def infer_architecture(state: StateDict) -> Dict[str, Any]:
    """What a ViT state dict says about its architecture (after conversion to this package's names)."""
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    arch: Dict[str, Any] = {"depth": max(blocks) + 1 if blocks else 0}
    if "cls_token" in state:
        arch["embed_dim"] = state["cls_token"].shape[-1]
    proj = state.get("patch_embed.proj.weight")
    if proj is not None:
        arch["patch_size"] = proj.shape[-1]
        arch["in_chans"] = proj.shape[1]
    arch["num_register_tokens"] = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    arch["distilled"] = "dist_token" in state
    arch["layerscale"] = "blocks.0.ls1.gamma" in state
    arch["ffn_layer"] = "swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp"
    arch["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    return arch


def _spec_architecture(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "depth": kwargs["depth"],
        "embed_dim": kwargs["embed_dim"],
        "patch_size": kwargs.get("patch_size", 16),
        "num_register_tokens": kwargs.get("num_register_tokens", 0),
        "distilled": kwargs.get("distilled", False),
        "layerscale": bool(kwargs.get("layerscale_init")),
        "ffn_layer": kwargs.get("ffn_layer", "mlp"),
    }


def guess_backbone_name(state: StateDict) -> Optional[str]:
    """The registered name whose architecture the state dict matches, official names first."""
    arch = infer_architecture(state)
    keys = ("depth", "embed_dim", "patch_size", "num_register_tokens", "distilled", "layerscale", "ffn_layer")
    side = perfect_square_root(state["pos_embed"].shape[1] - 1 - arch["distilled"]) if "pos_embed" in state else None
    matches = []
    for name in list_backbones():
        spec = get_spec(name)
        if "embed_dim" not in spec.kwargs:  # not a ViT
            continue
        if all(_spec_architecture(spec.kwargs).get(k) == arch.get(k) for k in keys):
            same_grid = side is not None and side * spec.kwargs.get("patch_size", 16) == spec.img_size
            matches.append((spec.family == "vit", not same_grid, name))
    return min(matches)[2] if matches else None


def _describe(arch: Dict[str, Any]) -> str:
    parts = [f"embed_dim {arch.get('embed_dim', '?')}", f"depth {arch['depth']}", f"patch {arch.get('patch_size', '?')}"]
    if arch["num_register_tokens"]:
        parts.append(f"{arch['num_register_tokens']} registers")
    if arch["distilled"]:
        parts.append("distillation token")
    if arch["layerscale"]:
        parts.append("LayerScale")
    if arch["ffn_layer"] != "mlp":
        parts.append(arch["ffn_layer"])
    if arch["num_classes"]:
        parts.append(f"{arch['num_classes']}-class head")
    return ", ".join(parts)


def key_listing(keys: List[str], limit: int = 8) -> str:
    """Keys with block indices folded (blocks.*.ls1.gamma x12), so that the distinctive ones stay visible."""
    counts: Dict[str, int] = {}
    for key in keys:
        folded = re.sub(r"^((?:\w+\.)*?)blocks\.\d+\.", r"\1blocks.*.", key)
        counts[folded] = counts.get(folded, 0) + 1
    items = [f"{k} x{n}" if n > 1 else k for k, n in counts.items()]
    shown = ", ".join(items[:limit])
    return f"{shown} (+{len(items) - limit} more)" if len(items) > limit else shown


@dataclass
class KeyDifferences:
    """How a state dict differs from the one a module expects."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shapes: List[str] = field(default_factory=list)  # "key file [..] vs model [..]"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def lines(self) -> List[str]:
        """One line per kind of difference, keys folded."""
        found = []
        if self.missing:
            found.append(f"missing keys ({len(self.missing)}): {key_listing(self.missing)}")
        if self.unexpected:
            found.append(f"unexpected keys ({len(self.unexpected)}): {key_listing(self.unexpected)}")
        if self.shapes:
            found.append(f"shape mismatches ({len(self.shapes)}): {key_listing(self.shapes, 4)}")
        return found


def key_differences(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> KeyDifferences:
    """The keys of `expected` (a module's state dict) that `state` lacks, those it has in excess, and the shared
    keys whose shapes differ."""
    return KeyDifferences(
        missing=sorted(set(expected) - set(state)),
        unexpected=sorted(set(state) - set(expected)),
        shapes=sorted(f"{k} file {list(state[k].shape)} vs model {list(expected[k].shape)}"
                      for k in set(expected) & set(state) if state[k].shape != expected[k].shape),
    )


def mismatch_report(state: StateDict, model: torch.nn.Module, source: str) -> Optional[str]:
    """None if the state dict fits the model exactly, else one message saying what differs and what to use."""
    differences = key_differences(state, model.state_dict())
    if not differences:
        return None
    name = getattr(model, "registry_name", type(model).__name__)
    lines = [f"{source} does not fit backbone '{name}':"] + [f"  {line}" for line in differences.lines()]
    arch = infer_architecture(state)
    guess = guess_backbone_name(state)
    described = f"the file holds a ViT with {_describe(arch)}"
    if guess and guess != name:
        lines.append(f"  {described}: it looks like '{guess}' -> create_backbone('{guess}', pretrained=...)")
    elif guess == name:
        lines.append(f"  {described}, the architecture of '{name}': check the overrides passed to create_backbone")
    else:
        lines.append(f"  {described}; no registered name matches: build it with create_backbone('vit_...', "
                     "embed_dim=..., depth=..., patch_size=...) to match")
    return "\n".join(lines)
