"""Classifiers from timm or torchvision by name: DeiT's CNN teachers (RegNetY-16GF, ResNet-50, ...) and the
networks the teacher recipes train.

Weights come from a local file in the timm or torchvision layout (a bare state dict, or one under `model`,
`state_dict` or `state_dict_ema`), or one written by `distill train`; they are read without running code.
`weights="hub"` asks timm to download its pretrained weights (needs internet).
"""

import difflib
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from distill.errors import CheckpointError, InputError
from distill.models.checkpoint import TrainingCheckpoint, is_training_checkpoint, read_checkpoint, strip_wrappers
from distill.models.diagnosis import key_differences

logger = logging.getLogger(__name__)

SOURCES = ("auto", "timm", "torchvision")
STATE_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")


def split_source(name: str, source: str = "auto") -> Tuple[str, str]:
    """("timm", "resnet50") from "timm:resnet50" or from ("resnet50", "auto"), deciding which library knows it."""
    if ":" in name:
        source, name = name.split(":", 1)
    if source not in SOURCES:
        raise InputError(f"classifier source {source!r}: choose one of {', '.join(SOURCES)}")
    import timm
    import torchvision

    in_timm = timm.is_model(name)
    in_torchvision = name in torchvision.models.list_models(module=torchvision.models)
    if source == "auto":
        source = "timm" if in_timm else "torchvision" if in_torchvision else ""
    if (source == "timm" and not in_timm) or (source == "torchvision" and not in_torchvision) or not source:
        known = timm.list_models() + torchvision.models.list_models(module=torchvision.models)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        where = f"{source}" if source else "timm or torchvision"
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists timm's names)"
        raise InputError(f"classifier {name!r} is not a model {where} knows{hint}")
    return source, name


class Classifier(nn.Module):
    """A timm or torchvision network behind one interface: forward(images) -> logits."""

    def __init__(self, name: str, num_classes: int, in_chans: int = 3, img_size: int = 224, source: str = "auto",
                 hub_weights: bool = False, **kwargs) -> None:
        super().__init__()
        self.source, self.name = split_source(name, source)
        if self.source == "timm":
            import timm

            try:
                self.net = timm.create_model(self.name, pretrained=hub_weights, num_classes=num_classes,
                                             in_chans=in_chans, **kwargs)
            except Exception as error:
                if hub_weights:
                    raise InputError(f"timm could not fetch pretrained weights for {self.name} ({error}); without "
                                     "internet, pass a local weight file instead") from None
                raise
        else:
            import torchvision

            if hub_weights:
                raise InputError("weights='hub' is for timm models; for torchvision, pass a local weight file")
            self.net = torchvision.models.get_model(self.name, weights=None, num_classes=num_classes, **kwargs)
            if in_chans != 3:
                raise InputError(f"torchvision's {self.name} takes 3-channel images; leave in_chans at 3 (grey "
                                 "images are repeated to RGB for it) or use the timm model of that name")
        self.num_classes, self.embed_dim = num_classes, _feature_dim(self.net)
        self.config = dict(in_chans=in_chans, img_size=(img_size, img_size), num_classes=num_classes,
                           name=f"{self.source}:{self.name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def no_weight_decay(self) -> set:
        return set()

    def classifier_weight_name(self) -> Optional[str]:
        """The state-dict key of the last layer's weight ("fc.weight", "head.fc.weight", ...)."""
        last = None
        for key, value in self.net.state_dict().items():
            if key.endswith("weight") and value.ndim == 2 and value.shape[0] == self.num_classes:
                last = key
        return last

    def load_weights(self, path: str) -> None:
        """Load a local weight file strictly; a class count or architecture that differs is a clear error."""
        obj = read_checkpoint(path)
        state = _network_state(obj, Path(path))
        own = self.net.state_dict()
        head = self.classifier_weight_name()
        if head is not None and head in state and state[head].shape[0] != own[head].shape[0]:
            raise InputError(
                f"teacher weights {path} classify {state[head].shape[0]} classes but the dataset has "
                f"{own[head].shape[0]}: train a teacher on this dataset (configs/deit/*teacher*.yaml) or choose "
                "the matching weights")
        differences = key_differences(state, own)
        if differences:
            raise CheckpointError(f"{path} does not fit {self.source}'s {self.name}: "
                                  f"{'; '.join(differences.lines())}. Check the teacher name and its in_chans")
        self.net.load_state_dict(state, strict=True)
        logger.info("loaded teacher weights %s into %s:%s", path, self.source, self.name)


def _feature_dim(net: nn.Module) -> int:
    for attr in ("num_features", "embed_dim"):
        if isinstance(getattr(net, attr, None), int):
            return getattr(net, attr)
    fc = getattr(net, "fc", None) or getattr(net, "classifier", None) or getattr(net, "heads", None)
    linear = [m for m in (fc.modules() if fc is not None else []) if isinstance(m, nn.Linear)]
    return linear[-1].in_features if linear else 0


def _network_state(obj, path: Path) -> Dict[str, torch.Tensor]:
    """The classifier's state dict inside a file: bare, under a usual key, or a distill export / checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if is_training_checkpoint(obj):
        run = TrainingCheckpoint(obj, str(path))
        state = run.network(run.eval_network)
    elif any(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        key = next((k for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise CheckpointError(f"{path}: no weights found; top-level keys are {sorted(obj)[:10]}")
        state = obj[key]
    cleaned = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            key = strip_wrappers(key)
            cleaned[key[4:] if key.startswith("net.") else key] = value
    return cleaned


def create_classifier(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224, weights: Optional[str] = None,
                      source: str = "auto", **kwargs) -> Classifier:
    """A timm / torchvision classifier; weights: None (random), a local file, or "hub" (timm's download)."""
    model = Classifier(name, num_classes, in_chans, img_size, source, hub_weights=weights == "hub", **kwargs)
    if weights and weights != "hub":
        model.load_weights(weights)
    return model
