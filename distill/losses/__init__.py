"""Losses, one per file, each checkable against its paper on its own."""

from distill.losses.centering import CENTERINGS
from distill.losses.deit import DistillationLoss
from distill.losses.dino import DINOLoss
from distill.losses.ibot import IBOTPatchLoss
from distill.losses.koleo import KoLeoLoss
from distill.losses.sinkhorn import sinkhorn_knopp

__all__ = ["CENTERINGS", "DINOLoss", "DistillationLoss", "IBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]
