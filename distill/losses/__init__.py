"""Losses, one per file, each checkable against its paper on its own.

The names below are imported on first use, so that `distill.losses.kinds` (what the config schemas check
against) loads without PyTorch.
"""

import importlib
from typing import Any

from distill.losses.kinds import CENTERINGS, CRITERIA, DISTILLATION_TYPES

_WHERE = {"DINOLoss": "dino", "DistillationLoss": "deit", "IBOTPatchLoss": "ibot", "KoLeoLoss": "koleo",
          "sinkhorn_knopp": "sinkhorn", "CenteredTeacherLoss": "centering"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"distill.losses.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'distill.losses' has no attribute {name!r}")


__all__ = ["CENTERINGS", "CRITERIA", "DISTILLATION_TYPES", *_WHERE]
