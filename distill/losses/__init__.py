"""Losses, one per file, each checkable against its paper on its own."""

from distill.losses.deit import DistillationLoss
from distill.losses.dino import DINOLoss

__all__ = ["DINOLoss", "DistillationLoss"]
