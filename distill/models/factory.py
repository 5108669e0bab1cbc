"""create_backbone: a registered backbone built by name, optionally with weights from any checkpoint file."""

from typing import Any, Optional

from torch import nn

from distill.models.checkpoint import load_pretrained
from distill.models.registry import backbone_kwargs, get_spec


def create_backbone(
    name: str,
    pretrained: Optional[str] = None,
    checkpoint_key: Optional[str] = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered backbone (a VisionTransformer, or a ResNetBackbone for resnet* names), optionally loading
    weights from a checkpoint file.

    name: a registered name (`list_backbones()`), e.g. "dinov2_vits14_reg" or "vit_small_patch8".
    pretrained: path to any official checkpoint layout (DINO, DeiT, DINOv2, timm) or one written by distill.
    checkpoint_key: which network of a training checkpoint to load ("teacher" by default, or "student",
        "model_ema", ...).
    overrides: constructor arguments that replace the registered defaults (img_size, patch_size, depth, ...).
    """
    model = get_spec(name).factory(**backbone_kwargs(name, **overrides))
    model.registry_name = name
    if pretrained is not None:
        load_pretrained(model, pretrained, checkpoint_key=checkpoint_key)
    return model
