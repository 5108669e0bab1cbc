"""Training paradigms behind a name; each brings its config section and its builder."""

from typing import Callable, Dict, Tuple, Type

from distill.errors import InputError
from distill.objectives import deit, dino, dinov2
from distill.objectives.base import Objective, ObjectiveConfig, StepInfo

OBJECTIVES: Dict[str, Tuple[Type[ObjectiveConfig], Callable]] = {
    "dino": (dino.DINOConfig, dino.build),
    "deit": (deit.DeiTConfig, deit.build),
    "dinov2": (dinov2.DINOv2Config, dinov2.build),
}


def objective_config_class(name: str) -> Type[ObjectiveConfig]:
    if name not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name][0]


def build_objective(config, make_backbone, source=None) -> Objective:
    """The configured objective; `source` (the training images) tells it what it needs of the data (classes)."""
    return OBJECTIVES[config.objective.name][1](config, make_backbone, source)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "StepInfo", "build_objective", "objective_config_class"]
