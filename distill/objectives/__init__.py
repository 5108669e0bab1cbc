"""Training paradigms behind a name; each brings its config section and its builder.

A new paradigm is one module with an ObjectiveConfig subclass, an Objective subclass and a builder
`build(config, source) -> Objective`, registered with register_objective; the trainer needs no change.
Builders may be given as "module:function" and are imported only when an objective is built, so that choosing
and checking a config loads no PyTorch.
"""

import importlib
from typing import Any, Callable, Dict, Tuple, Type, Union

from distill.errors import InputError
from distill.objectives.configs import DeiTConfig, DINOConfig, DINOv2Config, ObjectiveConfig

Builder = Union[Callable[..., Any], str]  # (config: the whole run config, source: the training images) -> Objective
OBJECTIVES: Dict[str, Tuple[Type[ObjectiveConfig], Builder]] = {}


def register_objective(name: str, config_class: Type[ObjectiveConfig], build: Builder) -> None:
    """Make `objective.name=<name>` select this config section and builder (a callable, or "module:function")."""
    OBJECTIVES[name] = (config_class, build)


register_objective("dino", DINOConfig, "distill.objectives.dino:build")
register_objective("deit", DeiTConfig, "distill.objectives.deit:build")
register_objective("dinov2", DINOv2Config, "distill.objectives.dinov2:build")


def objective_config_class(name: str) -> Type[ObjectiveConfig]:
    if name not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name][0]


def build_objective(config, source=None):
    """The configured objective; `source` (the training images) tells it what it needs of the data (classes)."""
    build = OBJECTIVES[config.objective.name][1]
    if isinstance(build, str):
        module, function = build.split(":")
        build = getattr(importlib.import_module(module), function)
    return build(config, source)


_RUN_TIME = {"Objective": "distill.objectives.base", "StepInfo": "distill.objectives.base",
             "build_backbone": "distill.objectives.base"}


def __getattr__(name: str) -> Any:  # the run-time classes, imported on first use (they need PyTorch)
    if name in _RUN_TIME:
        return getattr(importlib.import_module(_RUN_TIME[name]), name)
    raise AttributeError(f"module 'distill.objectives' has no attribute {name!r}")


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "StepInfo", "build_backbone", "build_objective",
           "objective_config_class", "register_objective"]
