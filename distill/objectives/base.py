"""The contract between the trainer and a training paradigm.

The trainer runs the loop (precision, accumulation, clipping, schedules of lr and weight decay, checkpoints,
logs) and knows nothing else; an objective owns its networks, heads, losses and what happens around each
optimizer step. Adding a paradigm is one file here and one recipe.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from distill.data.eval_views import EvalView
from distill.models import create_backbone
from distill.models.registry import backbone_options
from distill.schedules import stretch_ahead


@dataclass
class StepInfo:
    step: int  # optimizer steps done before this one
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch


class Objective(nn.Module):
    """Subclasses implement the methods below; `forward(batch, info)` returns {"loss": tensor, ...} where the
    other entries are floats or 0-d tensors to log.

    `frozen` names submodules that never train (a teacher loaded from a file): they stay in eval mode and are
    left out of checkpoints, which hold only what training changes; loading a checkpoint keeps their weights.
    """

    frozen: Tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for name in self.frozen:
            for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = dict(state_dict)
        for name in self.frozen:
            module = getattr(self, name, None)
            if module is not None:
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return super().load_state_dict(state, strict, assign)

    def plan(self, total_steps: int, epochs: float) -> None:
        """(Re)build the objective's own schedules for a run of total_steps optimizer steps that stands for `epochs`
        epochs (a time budget may compress the run: lengths given in epochs keep their share of it). Per-step value
        arrays are attributes named `*_schedule` (numpy arrays), so that replan() can carry them on."""

    def replan(self, step: int, total_steps: int, epochs: float) -> None:
        """The plan changed at `step` (a time budget re-fitted): lengths in steps are planned again for the new
        total, and every `*_schedule` array keeps its values so far and stretches what was still ahead (no jump)."""
        before = {name: value for name, value in vars(self).items()
                  if name.endswith("_schedule") and isinstance(value, np.ndarray)}
        self.plan(total_steps, epochs)
        for name, schedule in before.items():
            setattr(self, name, stretch_ahead(schedule, step, total_steps))

    def views(self, channels: int):
        """The training views the loader makes for this objective."""
        raise NotImplementedError

    def eval_view(self, channels: int) -> EvalView:
        """The view the evaluated networks see (kNN, classifiers, attention maps); by default the one that goes with
        the config's `views` section (a ViewsConfig)."""
        return self.config.views.eval_view(channels)

    def sampler_repeats(self) -> int:
        """Repeated augmentation: each image this many times per batch (0: off)."""
        return 0

    def classifiers(self) -> Dict[str, nn.Module]:
        """Networks that map images to class logits, evaluated (top-1 / top-5) at the end of training."""
        return {}

    def epoch_classifiers(self) -> Dict[str, nn.Module]:
        """The classifiers also evaluated at the end of each epoch (all by default; one that never changes, such as
        a frozen teacher, need not be)."""
        return self.classifiers()

    def trainable_module(self) -> nn.Module:
        """The network the optimizer updates (and DDP wraps)."""
        raise NotImplementedError

    def before_optimizer_step(self, info: StepInfo) -> None:
        """After backward and gradient clipping, before the optimizer step."""

    def after_optimizer_step(self, info: StepInfo) -> None:
        """After the optimizer step (EMA teachers, ...)."""

    def scheduled_values(self, step: int) -> Dict[str, float]:
        """Values of the objective's schedules at a step, for the logs."""
        return {}

    def eval_backbone(self) -> nn.Module:
        """The backbone to evaluate (kNN, linear probe, attention maps)."""
        raise NotImplementedError

    def eval_backbone_prefix(self) -> str:
        """Where eval_backbone() sits in this module's state dict, e.g. "teacher.backbone."."""
        target = self.eval_backbone()
        for name, module in self.named_modules():
            if module is target:
                return f"{name}."
        raise RuntimeError("eval_backbone() is not a submodule of the objective")

    def export(self, folder: Path) -> List[Path]:
        """Write the trained networks in official layouts; returns the files written."""
        return []

    def forward(self, batch: Dict[str, Any], info: StepInfo) -> Dict[str, Any]:
        raise NotImplementedError

    def compile_backbones(self) -> None:
        """torch.compile every backbone in place (parameter names, hence checkpoints, stay the same).

        Static shapes: one graph per crop resolution (two for DINO). Dynamic shapes send the position-embedding
        interpolation through a symbolic-size path that PyTorch 2.15's inductor rejects (an internal assert).
        """
        from distill.models.resnet import ResNetBackbone
        from distill.models.vit import VisionTransformer

        for module in self.modules():
            if isinstance(module, (VisionTransformer, ResNetBackbone)):
                module.compile(dynamic=False)


def scalar(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def build_backbone(model: Any, stochastic_depth: bool = True, **overrides: Any) -> nn.Module:
    """The backbone a run's `model` section describes: its registry name, its overrides (and `overrides` here) and
    its starting weights (model.pretrained, model.checkpoint_key). stochastic_depth=False builds it without drop
    path (an EMA teacher)."""
    overrides = {**model.overrides, **overrides}
    if not stochastic_depth and "drop_path_rate" in backbone_options(model.backbone):
        overrides["drop_path_rate"] = 0.0
    return create_backbone(model.backbone, pretrained=model.pretrained, checkpoint_key=model.checkpoint_key,
                           **overrides)
