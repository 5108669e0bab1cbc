"""Vision Transformer backbones behind registry names, and loading of official checkpoints."""

from distill.models.checkpoint import LoadReport, load_pretrained, read_checkpoint
from distill.models.factory import create_backbone
from distill.models.registry import backbone_kwargs, get_spec, list_backbones
from distill.models.vit import VisionTransformer

__all__ = [
    "LoadReport",
    "VisionTransformer",
    "backbone_kwargs",
    "create_backbone",
    "get_spec",
    "list_backbones",
    "load_pretrained",
    "read_checkpoint",
]
