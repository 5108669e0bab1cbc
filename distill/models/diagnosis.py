"""What a state dict says about the network it came from, and what to tell a user when it does not fit a model.

A file that does not load gets one message: the keys missing, unexpected and of other shapes (block indices
folded, so that the distinctive ones stay visible), the architecture the file holds (a ViT or an XCiT), and the
registered name it looks like.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from distill.models.registry import get_spec, list_backbones
from distill.models.vit import VisionTransformer
from distill.models.xcit import XCiTBackbone

StateDict = Dict[str, torch.Tensor]


def perfect_square_root(n: int) -> Optional[int]:
    """The side of a square grid of n tokens, or None when n is not a square."""
    root = int(round(n**0.5))
    return root if root * root == n else None


def _indices(state: StateDict, pattern: str) -> set:
    """The integers that the first group of `pattern` (matched at the start of each key) takes."""
    return {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}


def is_xcit_state(state: StateDict) -> bool:
    """Whether a state dict holds an XCiT: class-attention blocks after the patch blocks (both layouts)."""
    return any(k.startswith("cls_attn_blocks.") for k in state)


def infer_xcit_architecture(state: StateDict) -> Dict[str, Any]:
    """What an XCiT state dict (official or timm layout) says about its architecture."""
    convs = _indices(state, r"patch_embed\.proj\.(\d+)\.0\.weight")  # each a stride-2 3x3 convolution
    first_conv = state.get("patch_embed.proj.0.0.weight")
    temperature = state.get("blocks.0.attn.temperature")  # [heads, 1, 1]
    blocks, class_blocks = _indices(state, r"blocks\.(\d+)\."), _indices(state, r"cls_attn_blocks\.(\d+)\.")
    return {
        "kind": "xcit",
        "depth": max(blocks) + 1 if blocks else 0,
        "cls_attn_layers": max(class_blocks) + 1 if class_blocks else 0,
        "embed_dim": state["cls_token"].shape[-1] if "cls_token" in state else None,
        "patch_size": 2 ** len(convs) if convs else None,
        "num_heads": temperature.shape[0] if temperature is not None else None,
        "in_chans": first_conv.shape[1] if first_conv is not None else None,
        "timm_layout": any(k.startswith("pos_embed.") or ".attn.q." in k for k in state),
    }


def infer_architecture(state: StateDict) -> Dict[str, Any]:
    """What a ViT or XCiT state dict says about its architecture (after conversion to this package's names);
    "kind" says which."""
    if is_xcit_state(state):
        return infer_xcit_architecture(state)
    blocks = _indices(state, r"blocks\.(\d+)\.")
    arch: Dict[str, Any] = {"kind": "vit", "depth": max(blocks) + 1 if blocks else 0}
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
    fc1 = state.get("blocks.0.mlp.fc1.weight")  # SwiGLU's hidden width is rounded: its ratio is not read back
    arch["mlp_ratio"] = fc1.shape[0] / arch["embed_dim"] if fc1 is not None and arch.get("embed_dim") else None
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
        "mlp_ratio": float(kwargs.get("mlp_ratio", 4.0)) if kwargs.get("ffn_layer", "mlp") == "mlp" else None,
    }


def _guess_xcit_name(arch: Dict[str, Any]) -> Optional[str]:
    """The registered XCiT of the same width, depth, heads and patch size (eta is not visible in trained weights)."""
    keys = ("depth", "embed_dim", "patch_size", "num_heads")
    for name in list_backbones():
        spec = get_spec(name)
        if spec.factory is XCiTBackbone and all(spec.kwargs.get(k) == arch[k] for k in keys):
            return name
    return None


def guess_backbone_name(state: StateDict) -> Optional[str]:
    """The registered name whose architecture the state dict matches, official names first."""
    arch = infer_architecture(state)
    if arch["kind"] == "xcit":
        return _guess_xcit_name(arch)
    keys = ("depth", "embed_dim", "patch_size", "num_register_tokens", "distilled", "layerscale", "ffn_layer",
            "mlp_ratio")
    side = perfect_square_root(state["pos_embed"].shape[1] - 1 - arch["distilled"]) if "pos_embed" in state else None
    matches = []
    for name in list_backbones():
        spec = get_spec(name)
        if spec.factory is not VisionTransformer:  # XCiTs and ResNets have other keys
            continue
        if all(_spec_architecture(spec.kwargs).get(k) == arch.get(k) for k in keys):
            same_grid = side is not None and side * spec.kwargs.get("patch_size", 16) == spec.img_size
            # a bare DINO backbone and a DeiT classifier share every block: the head (or its absence) decides
            same_head = bool(spec.kwargs.get("num_classes", 0)) == bool(arch.get("num_classes"))
            matches.append((not same_head, spec.family == "vit", not same_grid, name))
    return min(matches)[-1] if matches else None


def _describe_xcit(arch: Dict[str, Any]) -> str:
    def known(key: str) -> Any:
        return "?" if arch[key] is None else arch[key]

    parts = [f"embed_dim {known('embed_dim')}", f"depth {arch['depth']}", f"patch {known('patch_size')}",
             f"{known('num_heads')} heads", f"{arch['cls_attn_layers']} class-attention blocks"]
    return ", ".join(parts)


def _describe(arch: Dict[str, Any]) -> str:
    if arch.get("kind") == "xcit":
        return _describe_xcit(arch)
    parts = [f"embed_dim {arch.get('embed_dim', '?')}", f"depth {arch['depth']}", f"patch {arch.get('patch_size', '?')}"]
    if arch["num_register_tokens"]:
        parts.append(f"{arch['num_register_tokens']} registers")
    if arch["distilled"]:
        parts.append("distillation token")
    if arch["layerscale"]:
        parts.append("LayerScale")
    if arch["ffn_layer"] != "mlp":
        parts.append(arch["ffn_layer"])
    if arch.get("mlp_ratio") not in (None, 4.0):
        parts.append(f"mlp_ratio {arch['mlp_ratio']:g}")
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
    xcit = arch["kind"] == "xcit"
    described = f"the file holds {'an XCiT' if xcit else 'a ViT'} with {_describe(arch)}"
    if xcit and arch["timm_layout"]:
        lines.append(f"  {described}, in timm's layout (pos_embed.*, q/k/v): convert its state dict with "
                     "distill.models.xcit.from_timm_layout first")
    elif guess and guess != name:
        lines.append(f"  {described}: it looks like '{guess}' -> create_backbone('{guess}', pretrained=...)")
    elif guess == name:
        lines.append(f"  {described}, the architecture of '{name}': check the overrides passed to create_backbone")
    else:
        example = ("'dino_xcit_small_12_p16', embed_dim=..., depth=..., num_heads=..." if xcit
                   else "'vit_...', embed_dim=..., depth=...")
        lines.append(f"  {described}; no registered name matches: build it with create_backbone({example}, "
                     "patch_size=...) to match")
    return "\n".join(lines)
