"""Linear classification heads on frozen backbone features, kept with the recipe of their features so that they can
be applied again later: this project's layout (written by `distill eval linear --save-head`) and the released heads
of DINO and DINOv2.

Released layouts, and the features they take (D: the backbone's width):
- DINO `dino_*_linearweights.pth` (facebookresearch/dino eval_linear.py): {"state_dict": {"module.linear.weight",
  "module.linear.bias"}, "epoch", "best_acc", ...}. Features: the class tokens of the last n blocks, concatenated
  (ViT-S: n=4, 4D wide); with avgpool_patchtokens (ViT-B: n=1) the class token and the mean of the last block's
  patch tokens are *interleaved* (`torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1)`: cls_0,
  mean_0, cls_1, mean_1, ...), 2D wide; the columns of such a head are reordered here to the concatenated layout.
  ResNet-50: the pooled embedding.
- DINOv2 `dinov2_*_linear_head.pth` and `*_linear4_head.pth` (facebookresearch/dinov2 hub/classifiers.py): a bare
  {"weight", "bias"} over concat(class token, mean of the patch tokens) of the last block (2D wide), or over the
  class tokens of the last 4 blocks and the mean patch token of the last (5D wide); register tokens excluded.
Both were trained on ImageNet at 224 px (resize to 256, centre crop), with ImageNet's mean and std.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from distill.data.configs import IMAGENET_MEAN, IMAGENET_STD
from distill.errors import CheckpointError, InputError
from distill.eval.linear import linear_features
from distill.files import atomic_write
from distill.models.checkpoint import read_checkpoint, strip_wrappers

HEAD_FORMAT = "distill-linear-head-1"
RECIPE_KEYS = ("n_last_blocks", "avgpool", "image_size", "mean", "std", "resize_ratio", "class_names")


@dataclass
class HeadRecipe:
    """How the features a head takes are made: which tokens (n_last_blocks class tokens, then the mean patch token
    of the last block with avgpool) from which view (image_size px after resizing the short side to
    image_size * resize_ratio and centre cropping, normalised by mean / std), and the classes it names."""

    n_last_blocks: int = 1
    avgpool: bool = False
    image_size: Optional[int] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    resize_ratio: Optional[float] = None
    class_names: Optional[List[str]] = None

    def feature_dim(self, embed_dim: int, vit: bool = True) -> int:
        """Width of the features for a backbone of width embed_dim (a ViT's tokens, or a CNN's pooled embedding)."""
        return embed_dim * (self.n_last_blocks + int(self.avgpool)) if vit else embed_dim

    def describe(self, embed_dim: int, vit: bool = True) -> str:
        if not vit:
            return f"the {embed_dim}-d pooled embedding"
        tokens = f"{self.n_last_blocks} class token{'s' if self.n_last_blocks > 1 else ''}"
        pooled = " + the mean patch token" if self.avgpool else ""
        return f"{tokens}{pooled} x {embed_dim}"


# The view the released DINO and DINOv2 heads were trained with (their eval_linear.py / eval/linear.py).
OFFICIAL_VIEW = dict(image_size=224, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), resize_ratio=256 / 224)


@dataclass
class LinearHead:
    """A linear classifier over the features its recipe describes: weight [C, F], bias [C]."""

    weight: torch.Tensor
    bias: torch.Tensor
    recipe: HeadRecipe
    layout: str  # distill | dino | dinov2
    source: str
    notes: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def linear(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.num_classes)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer

    def reordered(self, order: Sequence[int]) -> "LinearHead":
        """The same head with its outputs permuted: output i is the old output order[i]."""
        index = torch.as_tensor(list(order), dtype=torch.long)
        names = self.recipe.class_names
        recipe = replace(self.recipe, class_names=[names[i] for i in order] if names else names)
        return replace(self, weight=self.weight[index], bias=self.bias[index], recipe=recipe)


class HeadClassifier(nn.Module):
    """A backbone and a linear head: images [B, C, H, W] -> logits [B, classes]. The head runs in float32 under any
    autocast, as `distill eval linear` trains and scores it on float32 features."""

    def __init__(self, backbone: nn.Module, head: LinearHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.recipe = head.recipe
        self.head = head.linear()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, F] as the recipe says (eval/linear.py linear_features)."""
        return linear_features(self.backbone, images, self.recipe.n_last_blocks, self.recipe.avgpool)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.head(features.float())


def _backbone_width(backbone: nn.Module):
    """(embed_dim, is_vit): the width of the backbone's tokens, or of a CNN's pooled embedding."""
    width = getattr(backbone, "embed_dim", None)
    if not isinstance(width, int):
        raise InputError(f"a linear head needs a backbone with an embed_dim; {type(backbone).__name__} has none")
    return width, hasattr(backbone, "get_intermediate_layers")


# --------------------------------------------------------------------------------------------- this project's layout


def save_linear_head(path: Union[str, Path], classifier: nn.Linear, recipe: HeadRecipe,
                     notes: Optional[Dict[str, Any]] = None) -> Path:
    """Write a classifier on raw features (weight [C, F], bias [C]) with its recipe, atomically, as a dict of tensors
    and plain values that torch.load(..., weights_only=True) reads. notes: plain values kept beside (scores, data)."""
    payload: Dict[str, Any] = {
        "format": HEAD_FORMAT,
        "weight": classifier.weight.detach().float().cpu().clone(),
        "bias": classifier.bias.detach().float().cpu().clone(),
        "n_last_blocks": int(recipe.n_last_blocks),
        "avgpool": bool(recipe.avgpool),
        "image_size": None if recipe.image_size is None else int(recipe.image_size),
        "mean": None if recipe.mean is None else [float(v) for v in recipe.mean],
        "std": None if recipe.std is None else [float(v) for v in recipe.std],
        "resize_ratio": None if recipe.resize_ratio is None else float(recipe.resize_ratio),
        "class_names": None if recipe.class_names is None else [str(n) for n in recipe.class_names],
        "notes": dict(notes or {}),
    }
    if payload["class_names"] is not None and len(payload["class_names"]) != payload["weight"].shape[0]:
        raise InputError(f"{len(payload['class_names'])} class names for a head of {payload['weight'].shape[0]} "
                         "outputs: give one name per output")
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def _own_layout(obj: Dict[str, Any], source: str) -> LinearHead:
    weight, bias = obj.get("weight"), obj.get("bias")
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise CheckpointError(f"{source} is a {HEAD_FORMAT} head without its weight and bias tensors: write it again "
                              "with `distill eval linear --save-head`")
    recipe = HeadRecipe(**{k: obj.get(k) for k in RECIPE_KEYS if obj.get(k) is not None})
    return LinearHead(weight.float(), bias.float(), recipe, "distill", source, dict(obj.get("notes") or {}))


# --------------------------------------------------------------------------------------------- released layouts


def _dino_head(weight: torch.Tensor, bias: torch.Tensor, width: int, vit: bool, source: str) -> LinearHead:
    """DINO's eval_linear.py: features [B, n * D] (class tokens), or [B, 2D] interleaved with avgpool (n=1 only);
    the interleaved columns are put in the concatenated order [cls | mean]."""
    view = dict(OFFICIAL_VIEW)
    features = weight.shape[1]
    if not vit:
        if features != width:
            raise InputError(_width_error(source, features, f"the {width}-d pooled embedding of the backbone"))
        return LinearHead(weight, bias, HeadRecipe(**view), "dino", source)
    if features == 2 * width:  # ViT-B's recipe: n_last_blocks=1, avgpool_patchtokens=True
        weight = torch.cat([weight[:, 0::2], weight[:, 1::2]], dim=1)
        return LinearHead(weight, bias, HeadRecipe(1, True, **view), "dino", source)
    if features % width == 0:  # ViT-S's recipe (n=4), or another --n_last_blocks without avgpool
        return LinearHead(weight, bias, HeadRecipe(features // width, False, **view), "dino", source)
    raise InputError(_width_error(source, features, f"n class tokens x {width} (DINO's linear heads take n x D, or "
                                                    "2 x D with avgpool)"))


def _dinov2_head(weight: torch.Tensor, bias: torch.Tensor, width: int, vit: bool, source: str) -> LinearHead:
    """DINOv2's hub/classifiers.py: layers=1 -> [cls, mean patch] (2D); layers=4 -> [cls x 4, mean patch] (5D)."""
    features = weight.shape[1]
    if vit and features in (2 * width, 5 * width):
        blocks = features // width - 1
        return LinearHead(weight, bias, HeadRecipe(blocks, True, **OFFICIAL_VIEW), "dinov2", source)
    given = f"{width}-d tokens: (1 + 1) x {width} or (4 + 1) x {width} for DINOv2's linear heads"
    raise InputError(_width_error(source, features, given if vit else f"a ViT; the backbone is a {width}-d CNN"))


def _width_error(source: str, features: int, backbone: str) -> str:
    return (f"linear head {source} takes {features}-d features but the backbone gives {backbone}: "
            "use the backbone the head was trained on (--checkpoint, --backbone)")


def _tensors(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return {strip_wrappers(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_dino_head(obj: Dict[str, Any]) -> bool:
    state = obj.get("state_dict")
    return isinstance(state, dict) and {"linear.weight", "linear.bias"} <= set(_tensors(state))


def load_linear_head(path: Union[str, Path], backbone: nn.Module) -> LinearHead:
    """The head in `path` (this project's layout, DINO's or DINOv2's), its recipe made for `backbone`, checked to
    take the features the backbone gives: weight [C, F] with F = the recipe's feature width."""
    source = str(path)
    obj = read_checkpoint(path)
    width, vit = _backbone_width(backbone)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a linear head")
    if obj.get("format") == HEAD_FORMAT:
        head = _own_layout(obj, source)
    elif _is_dino_head(obj):
        state = _tensors(obj["state_dict"])
        head = _dino_head(state["linear.weight"].float(), state["linear.bias"].float(), width, vit, source)
    elif set(_tensors(obj)) == {"weight", "bias"} and obj["weight"].ndim == 2:
        head = _dinov2_head(obj["weight"].float(), obj["bias"].float(), width, vit, source)
    else:
        raise CheckpointError(
            f"{source} is not a linear head this toolkit knows (top-level keys {sorted(map(str, obj))[:8]}): give "
            "one written by `distill eval linear --save-head`, DINO's dino_*_linearweights.pth or DINOv2's "
            "dinov2_*_linear[4]_head.pth")
    if head.bias.shape != (head.num_classes,):
        raise CheckpointError(f"{source}: bias of shape {list(head.bias.shape)} for a weight of "
                              f"{list(head.weight.shape)}; the file is damaged")
    expected = head.recipe.feature_dim(width, vit)
    if head.in_features != expected:
        raise InputError(_width_error(source, head.in_features,
                                      f"{expected}-d features ({head.recipe.describe(width, vit)})"))
    depth = len(getattr(backbone, "blocks", ()))
    if vit and depth and head.recipe.n_last_blocks > depth:  # e.g. a 4-block head read as n x D on a shallower net
        raise InputError(_width_error(source, head.in_features, f"{width}-d tokens from only {depth} blocks (the "
                                                                f"head reads {head.recipe.describe(width, vit)})"))
    return head


# --------------------------------------------------------------------------------------------- classes


def class_order(head_names: Optional[Sequence[str]], data_names: Sequence[str],
                num_outputs: int) -> Optional[List[int]]:
    """The head's outputs reordered so that output i is the data's class i (the head's other classes after them), or
    None when they already agree or either side does not name its classes (integer labels are indices)."""
    data_names = list(data_names or [])
    if not head_names or not data_names or data_names == [str(i) for i in range(len(data_names))]:
        return None
    head_names = list(head_names)
    unknown = [name for name in data_names if name not in head_names]
    if unknown:
        listed = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InputError(f"the data has {len(unknown)} class(es) the head does not know ({listed}); the head knows "
                         f"{', '.join(head_names[:10])}{', ...' if len(head_names) > 10 else ''}: evaluate it on "
                         "data with its classes")
    order = [head_names.index(name) for name in data_names]
    order += [i for i in range(num_outputs) if i not in set(order)]
    return None if order == list(range(num_outputs)) else order
