"""A backbone to evaluate, from any checkpoint: a distill run rebuilds its own architecture from the config
it carries, a Transformers folder from its config.json, a safetensors file `distill export` wrote from its header;
official and other files are built by name (given, or recognised from the weights)."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from distill.data.configs import default_normalisation
from distill.errors import CheckpointError, UnknownArchitecture
from distill.models import (
    VisionTransformer, backbone_kwargs, create_backbone, get_spec, load_pretrained, read_checkpoint,
)
from distill.models.checkpoint import TrainingCheckpoint, extract_state_dict, is_training_checkpoint
from distill.models.diagnosis import guess_backbone_name
from distill.models.hf_layout import backbone_from_hf_folder, hf_normalisation, is_hf_folder
from distill.models.registry import backbone_options

# The header of a safetensors file `distill export --to safetensors` writes: every value a string, as the format
# requires. "architecture" and "overrides" rebuild the network; mean, std and image_size are how it sees images.
EXPORTER = "distill"
METADATA_KEYS = ("format", "exporter", "architecture", "overrides", "mean", "std", "image_size", "num_classes")


@dataclass
class EvalSetup:
    """What evaluating a checkpoint needs besides its weights: image size and normalisation; and the registry
    name and overrides the network was built from."""

    image_size: int
    mean: List[float]
    std: List[float]
    source: str
    notes: List[str] = field(default_factory=list)
    backbone: str = ""
    overrides: Dict[str, Any] = field(default_factory=dict)


def export_metadata(architecture: str, overrides: Dict[str, Any], mean: List[float], std: List[float],
                    image_size: Tuple[int, int], num_classes: int) -> Dict[str, str]:
    """The safetensors header of an exported network (see METADATA_KEYS)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return {"format": "pt", "exporter": EXPORTER, "architecture": architecture, "overrides": json.dumps(plain),
            "mean": json.dumps([float(v) for v in mean]), "std": json.dumps([float(v) for v in std]),
            "image_size": json.dumps([int(v) for v in image_size]), "num_classes": str(int(num_classes))}


def exported_metadata(path) -> Optional[Dict[str, Any]]:
    """{"architecture", "overrides", "mean", "std", "image_size"} from the header of a safetensors file that
    `distill export` wrote, or None for any other file (or one whose header does not parse)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if header.get("exporter") != EXPORTER or "architecture" not in header:
            return None
        overrides = json.loads(header.get("overrides") or "{}")
        if isinstance(overrides.get("img_size"), list):
            overrides["img_size"] = tuple(overrides["img_size"])
        size = json.loads(header.get("image_size") or "null")
        return {"architecture": header["architecture"], "overrides": overrides,
                "mean": json.loads(header.get("mean") or "null"), "std": json.loads(header.get("std") or "null"),
                "image_size": int(size[0]) if size else None}
    except (OSError, ValueError, TypeError, AttributeError):  # a damaged header: the weights decide, as for others
        return None


def _resolve(checkpoint, obj: Any, backbone: Optional[str], overrides: Dict[str, Any], checkpoint_key: Optional[str],
             fashion_mnist: bool) -> Tuple[str, Dict[str, Any], List[float], List[float], Optional[int]]:
    """(registry name, overrides, mean, std, evaluation size or None) of the network a checkpoint holds."""
    mean, std = default_normalisation(fashion_mnist)
    size = None
    exported = exported_metadata(checkpoint) if isinstance(checkpoint, (str, Path)) else None
    if is_training_checkpoint(obj):
        run = TrainingCheckpoint(obj, str(checkpoint))
        backbone = backbone or run.backbone
        overrides = {**run.backbone_overrides, **overrides}
        view = run.eval_view()
        mean, std, size = view["mean"] or mean, view["std"] or std, view["size"]
    elif is_hf_folder(checkpoint):  # a Transformers folder: its config.json names the architecture
        if backbone is None:
            backbone, found = backbone_from_hf_folder(checkpoint)
            overrides = {**found, **overrides}
        mean, std = hf_normalisation(checkpoint) or (mean, std)
    elif exported is not None:  # a file `distill export` wrote: its header names the architecture
        if backbone is None:
            backbone_kwargs(exported["architecture"], **exported["overrides"])  # an unknown name is refused here
            backbone, overrides = exported["architecture"], {**exported["overrides"], **overrides}
        mean, std, size = exported["mean"] or mean, exported["std"] or std, exported["image_size"]
    elif backbone is None:
        state, _ = extract_state_dict(obj, checkpoint_key)
        backbone = guess_backbone_name(state)
        if backbone is None:
            raise UnknownArchitecture(f"cannot tell which architecture {checkpoint} holds: pass --backbone NAME "
                                  "(see `distill models`) and --set key=value for non-default sizes")
    return backbone, overrides, list(mean), list(std), size


def _build(checkpoint, obj: Any, backbone: str, overrides: Dict[str, Any], checkpoint_key: Optional[str],
           mean: List[float], std: List[float], size: Optional[int]):
    model: nn.Module = create_backbone(backbone, **overrides)
    report = load_pretrained(model, obj, checkpoint_key, label=str(checkpoint))
    size = size or model.config["img_size"][0]
    return model.eval(), EvalSetup(size, mean, std, report.source, report.notes, backbone, dict(overrides))


def load_backbone(
    checkpoint: str,
    backbone: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    checkpoint_key: Optional[str] = None,
    fashion_mnist: bool = False,
):
    """(backbone in eval mode, EvalSetup) for a checkpoint file, or a folder Transformers' save_pretrained wrote."""
    obj = read_checkpoint(checkpoint)
    resolved = _resolve(checkpoint, obj, backbone, dict(overrides or {}), checkpoint_key, fashion_mnist)
    return _build(checkpoint, obj, *resolved[:2], checkpoint_key, *resolved[2:])


def classifier_overrides(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """{"num_classes": N} when the weights hold a classifier head (head.weight: DeiT's files and runs, the heads of
    Transformers' classifiers), with "distilled": True beside a distillation token; {} for a backbone."""
    weight = state.get("head.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return {}
    found: Dict[str, Any] = {"num_classes": int(weight.shape[0])}
    if "dist_token" in state:
        found["distilled"] = True
    return found


def load_network(
    checkpoint: str,
    backbone: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    checkpoint_key: Optional[str] = None,
    fashion_mnist: bool = False,
    heads: bool = True,
    image_size: Optional[Tuple[int, int]] = None,
):
    """(network in eval mode, EvalSetup, whether it classifies): the classifier when the weights hold one (DeiT's
    files and runs, Transformers' ViT / DeiT classifiers) with as many classes as its head, else the backbone.

    Unlike load_backbone, a registered classifier name (deit_*) whose file holds no head gives the backbone, and
    heads=False gives the backbone of a classifier (its heads left out). Explicit overrides win. image_size
    (H, W): evaluated at this size; a ViT is built for it (over any img_size override), its position embedding
    resized once, at load.
    """
    obj = read_checkpoint(checkpoint)
    state, _ = extract_state_dict(obj, checkpoint_key)
    found = classifier_overrides(state) if heads else {}
    name, resolved, mean, std, size = _resolve(checkpoint, obj, backbone, {}, checkpoint_key, fashion_mnist)
    options = backbone_options(name)
    if "num_classes" in options:
        found.setdefault("num_classes", 0)
    if "distilled" in options and "dist_token" in state:
        found["distilled"] = True
    overrides = {**resolved, **{k: v for k, v in found.items() if k in options}, **(overrides or {})}
    if image_size is not None:
        size = int(image_size[0])
        if get_spec(name).factory is VisionTransformer:  # the others take any size as built
            overrides["img_size"] = tuple(int(v) for v in image_size)
    model, setup = _build(checkpoint, obj, name, overrides, checkpoint_key, mean, std, size)
    return model, setup, bool(getattr(model, "num_classes", 0))
