"""Training paradigms behind a name; each brings its config section and its builder.

A new paradigm is one module with an ObjectiveConfig subclass, an Objective subclass and a builder
`build(config, source) -> Objective`, registered with register_objective; the trainer needs no change.
"""

from typing import Callable, Dict, Tuple, Type

from distill.errors import InputError
from distill.objectives import deit, dino, dinov2
from distill.objectives.base import Objective, ObjectiveConfig, StepInfo, build_backbone

Builder = Callable[..., Objective]  # (config: the whole run config, source: the training images) -> Objective
OBJECTIVES: Dict[str, Tuple[Type[ObjectiveConfig], Builder]] = {}


def register_objective(name: str, config_class: Type[ObjectiveConfig], build: Builder) -> None:
    """Make `objective.name=<name>` select this config section and builder."""
    OBJECTIVES[name] = (config_class, build)


register_objective("dino", dino.DINOConfig, dino.build)
register_objective("deit", deit.DeiTConfig, deit.build)
register_objective("dinov2", dinov2.DINOv2Config, dinov2.build)


def objective_config_class(name: str) -> Type[ObjectiveConfig]:
    if name not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name][0]


def build_objective(config, source=None) -> Objective:
    """The configured objective; `source` (the training images) tells it what it needs of the data (classes)."""
    return OBJECTIVES[config.objective.name][1](config, source)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "StepInfo", "build_backbone", "build_objective",
           "objective_config_class", "register_objective"]
