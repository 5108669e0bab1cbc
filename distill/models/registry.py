"""Every backbone behind a name, in the manner of timm's model registry: what each name builds (create_backbone, in
factory.py, builds it).

Official names reproduce the released architectures exactly (so their checkpoints load strictly); the generic
vit_* names are the same sizes with DINOv2-style defaults, at any patch size (`vit_small_patch8` or
`create_backbone("vit_small", patch_size=8)`). Besides the ViTs, DINO released XCiTs (xcit.py) and a ResNet-50.
"""

import difflib
import fnmatch
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from torch import nn

from distill.errors import InputError
from distill.models.resnet import ResNetBackbone
from distill.models.vit import VisionTransformer
from distill.models.xcit import XCiTBackbone

# name: (embed_dim, depth, num_heads) of the ViT sizes (DeiT, Touvron et al. 2021; ViT-g/14 with 40 blocks of
# width 1536, DINOv2, Oquab et al. 2023)
SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "giant2": (1536, 40, 24),
}
SIZE_LETTERS = {"t": "tiny", "s": "small", "b": "base", "l": "large", "g": "giant2"}
# DINO's XCiTs (facebookresearch/dino hubconf.py): facebookresearch/xcit's xcit_small_12 and xcit_medium_24 (timm's
# xcit_*_224) without classifier. size: (embed_dim, depth, num_heads, LayerScale initial value eta)
XCIT_SIZES = {"small_12": (384, 12, 8, 1.0), "medium_24": (512, 24, 8, 1e-5)}

# The two official ways of resizing position embeddings (see layers/pos_embed.py).
OFFSET_RESIZE = dict(interpolate_offset=0.1, interpolate_antialias=False)
EXACT_RESIZE = dict(interpolate_offset=0.0, interpolate_antialias=True)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # dino | deit | dinov2 | vit | resnet (every ResNet, DINO's too: FLOPs trace them whole)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    factory: Callable[..., nn.Module] = VisionTransformer

    @property
    def img_size(self) -> int:
        return self.kwargs.get("img_size", 224)


_REGISTRY: Dict[str, BackboneSpec] = {}


def _register(name: str, family: str, size: str, **kwargs: Any) -> None:
    embed_dim, depth, num_heads = SIZES[size]
    if size == "giant2":
        kwargs.setdefault("ffn_layer", "swiglu")
    _REGISTRY[name] = BackboneSpec(name, family, dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs))


def _register_all() -> None:
    for letter, patch in (("s", 16), ("s", 8), ("b", 16), ("b", 8)):
        # DINO's released backbones: no head, no mask token, +0.1-offset resizing.
        _register(f"dino_vit{letter}{patch}", "dino", SIZE_LETTERS[letter], patch_size=patch, mask_token=False,
                  **OFFSET_RESIZE)
    for size in ("tiny", "small", "base"):
        for distilled in (False, True):
            infix = "distilled_" if distilled else ""
            resolutions = (224, 384) if size == "base" else (224,)
            for res in resolutions:
                # DeiT classifiers (1000 ImageNet classes). On-the-fly resizing follows timm, the usual way of
                # running DeiT at other sizes; the official repository only interpolates once, when fine-tuning.
                _register(f"deit_{size}_{infix}patch16_{res}", "deit", size, img_size=res, patch_size=16,
                          distilled=distilled, num_classes=1000, mask_token=False, **EXACT_RESIZE)
    for letter, size in SIZE_LETTERS.items():
        if letter == "t":
            continue
        common = dict(img_size=518, patch_size=14, layerscale_init=1e-5)
        _register(f"dinov2_vit{letter}14", "dinov2", size, **common, **OFFSET_RESIZE)
        _register(f"dinov2_vit{letter}14_reg", "dinov2", size, **common, num_register_tokens=4, **EXACT_RESIZE)
    for size in SIZES:
        extra = {"layerscale_init": 1e-5} if size == "giant2" else {}
        _register(f"vit_{size}", "vit", size, img_size=224, patch_size=16, **EXACT_RESIZE, **extra)
    for size, (embed_dim, depth, num_heads, eta) in XCIT_SIZES.items():
        for patch in (16, 8):
            name = f"dino_xcit_{size}_p{patch}"
            _REGISTRY[name] = BackboneSpec(name, "dino", dict(img_size=224, patch_size=patch, embed_dim=embed_dim,
                                                              depth=depth, num_heads=num_heads, eta=eta,
                                                              tokens_norm=True), XCiTBackbone)
    for depth in (18, 34, 50, 101):
        _REGISTRY[f"resnet{depth}"] = BackboneSpec(f"resnet{depth}", "resnet", {"depth": depth}, ResNetBackbone)
    # DINO's released ResNet-50: torchvision's keys without fc.* (dino_resnet50_pretrain.pth)
    _REGISTRY["dino_resnet50"] = BackboneSpec("dino_resnet50", "resnet", {"depth": 50}, ResNetBackbone)


_register_all()
_GENERIC_WITH_PATCH = re.compile(r"^vit_(tiny|small|base|large|giant2)_patch(\d+)$")


def _allowed_overrides(factory: Callable[..., nn.Module]) -> List[str]:
    return sorted(set(inspect.signature(factory.__init__).parameters) - {"self"})


def list_backbones(pattern: Optional[str] = None) -> List[str]:
    """Registered names, sorted; `pattern` filters with shell wildcards (e.g. "dinov2_*")."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_spec(name: str) -> BackboneSpec:
    """The registered spec of `name`; vit_<size>_patch<P> names resolve to the generic size at patch P."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _GENERIC_WITH_PATCH.match(name)
    if match:
        base = _REGISTRY[f"vit_{match.group(1)}"]
        return BackboneSpec(name, base.family, {**base.kwargs, "patch_size": int(match.group(2))})
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `distill models` lists them"
    raise InputError(f"unknown backbone {name!r}{hint}")


def backbone_options(name: str) -> List[str]:
    """The constructor arguments a backbone of this name takes (what overrides may set)."""
    return _allowed_overrides(get_spec(name).factory)


def backbone_kwargs(name: str, **overrides: Any) -> Dict[str, Any]:
    """Constructor arguments of `name` with `overrides` applied; unknown override keys are an error."""
    spec = get_spec(name)
    allowed = backbone_options(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise InputError(f"unknown backbone option(s) {', '.join(unknown)} for {name}; allowed: {', '.join(allowed)}")
    parameters = inspect.signature(spec.factory.__init__).parameters
    for key, value in overrides.items():
        _check_option(name, key, value, parameters[key].default)
    return {**spec.kwargs, **overrides}


_AT_LEAST_ONE = {"patch_size", "in_chans", "embed_dim", "depth", "num_heads"}


def _check_option(name: str, key: str, value: Any, default: Any) -> None:
    """An override of the kind its constructor default is (an int for an int, a finite number for a float, true
    or false for a flag), sizes positive: a bad value is one line naming it, not a failure deep in a layer."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):  # img_size may also be a pair
        values = list(value) if isinstance(value, (list, tuple)) and key == "img_size" else [value]
        ok, wanted = bool(values) and all(whole(v) for v in values), "a whole number"
        if ok and key in _AT_LEAST_ONE | {"img_size"} and min(values) < 1:
            ok, wanted = False, "a whole number of at least 1"
    elif isinstance(default, float):
        ok = (whole(value) or isinstance(value, float)) and math.isfinite(value)
        wanted = "a finite number"
    else:
        return
    if not ok:
        raise InputError(f"backbone option {key}={value!r} for {name}: give {wanted}")
