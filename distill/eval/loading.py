"""A backbone to evaluate, from any checkpoint: a distill run rebuilds its own architecture from the config
it carries; official and other files are built by name (given, or recognised from the weights)."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from distill.data.configs import default_normalisation
from distill.errors import CheckpointError
from distill.models import create_backbone, load_pretrained, read_checkpoint
from distill.models.checkpoint import TrainingCheckpoint, extract_state_dict, is_training_checkpoint
from distill.models.diagnosis import guess_backbone_name


@dataclass
class EvalSetup:
    """What evaluating a checkpoint needs besides its weights: image size and normalisation."""

    image_size: int
    mean: List[float]
    std: List[float]
    source: str
    notes: List[str] = field(default_factory=list)


def load_backbone(
    checkpoint: str,
    backbone: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    checkpoint_key: Optional[str] = None,
    fashion_mnist: bool = False,
):
    """(backbone in eval mode, EvalSetup) for a checkpoint file."""
    obj = read_checkpoint(checkpoint)
    overrides = dict(overrides or {})
    mean, std = default_normalisation(fashion_mnist)
    size = None
    if is_training_checkpoint(obj):
        run = TrainingCheckpoint(obj, str(checkpoint))
        backbone = backbone or run.backbone
        overrides = {**run.backbone_overrides, **overrides}
        view = run.eval_view()
        mean, std, size = view["mean"] or mean, view["std"] or std, view["size"]
    elif backbone is None:
        state, _ = extract_state_dict(obj, checkpoint_key)
        backbone = guess_backbone_name(state)
        if backbone is None:
            raise CheckpointError(f"cannot tell which architecture {checkpoint} holds: pass --backbone NAME "
                                  "(see `distill models`) and --set key=value for non-default sizes")
    model: nn.Module = create_backbone(backbone, **overrides)
    report = load_pretrained(model, obj, checkpoint_key, label=str(checkpoint))
    size = size or model.config["img_size"][0]
    return model.eval(), EvalSetup(size, list(mean), list(std), report.source, report.notes)
