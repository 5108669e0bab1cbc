"""What DINO and DINOv2 share at run time (their config: objectives/configs.py SelfDistillationConfig): the
schedules planned from it (teacher temperature warm-up, cosine EMA momentum, frozen last layers, a frozen
backbone), the projection heads restored from model.pretrained, and the watch for a collapsed teacher."""

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from distill import distributed
from distill.ema import ema_update
from distill.errors import CheckpointError
from distill.models import read_checkpoint
from distill.models.checkpoint import DEFAULT_KEYS, TrainingCheckpoint, is_training_checkpoint, strip_wrappers
from distill.objectives.base import StepInfo
from distill.objectives.configs import SelfDistillationConfig
from distill.schedules import cosine_schedule, epochs_to_steps, warmup_then_constant

logger = logging.getLogger(__name__)


class TeacherSchedules:
    """Mixed into the objectives of a SelfDistillationConfig: their schedules, one value per optimizer step."""

    config: SelfDistillationConfig

    def plan(self, total_steps: int, epochs: float) -> None:
        c = self.config
        self.teacher_temp_schedule = warmup_then_constant(
            c.warmup_teacher_temp, c.teacher_temp, epochs_to_steps(c.warmup_teacher_temp_epochs, epochs, total_steps),
            total_steps)
        self.momentum_schedule = cosine_schedule(c.momentum_teacher, c.momentum_teacher_end, total_steps)
        self.freeze_last_layer_steps = epochs_to_steps(c.freeze_last_layer_epochs, epochs, total_steps)
        self.freeze_backbone_steps = epochs_to_steps(c.freeze_backbone_epochs, epochs, total_steps)

    def freeze_last_layers(self, heads: List[nn.Module], info: StepInfo) -> None:
        """Drop the gradients of the heads' last layers early on: the prototypes stay put while the rest settles."""
        if info.step < self.freeze_last_layer_steps:
            for head in heads:
                for param in head.last_layer.parameters():
                    param.grad = None

    def freeze_backbone(self, backbone: nn.Module, info: StepInfo) -> None:
        """Drop the student backbone's gradients for the first freeze_backbone_epochs: fresh heads on a trained
        backbone would otherwise send their first, random gradients into it. A parameter without a gradient is
        skipped whole by the optimizers (AdamW's decoupled weight decay and SGD's / LARS's momentum included), so
        the backbone stays exactly as loaded. (Gradient clipping runs before this: with optim.clip_mode=global the
        backbone's gradients still count in the clipped norm.)"""
        if self.backbone_frozen(info):
            for param in backbone.parameters():
                param.grad = None

    def backbone_frozen(self, info: StepInfo) -> bool:
        return info.step < self.freeze_backbone_steps

    def update_average(self, average: nn.Module, network: nn.Module, momentum: float, info: StepInfo) -> None:
        """The EMA of a network (backbone and heads) into its average (the teacher, or DINOv2's student EMA). While
        the student's backbone is frozen, the average's backbone is left as it is: it started equal to the frozen
        one (both come from model.pretrained), and an EMA of equal weights only adds rounding."""
        if not self.backbone_frozen(info):
            ema_update(average, network, momentum)
            return
        for name, module in average.named_children():
            if name != "backbone":
                ema_update(module, getattr(network, name), momentum)


# Where each head of a DINO / DINOv2 network may come from in a file, in order of preference. DINO's `head` and
# DINOv2's `dino_head` are the same kind of head (class token -> prototypes), so each restores the other.
HEAD_SOURCES: Dict[str, Tuple[str, ...]] = {"head": ("head", "dino_head"), "dino_head": ("dino_head", "head"),
                                            "ibot_head": ("ibot_head",)}
# Weight-normalised last layers saved through torch.nn.utils.parametrizations.weight_norm, in DINO's names.
PARAMETRIZED = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
                "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}
# The objective's options that set each size of a head (see _head_sizes), by the head's name in the network.
HeadOptions = Dict[str, Dict[str, Tuple[str, ...]]]
_SHARED_SIZES = {"hidden_dim": ("hidden_dim",), "head_layers": ("head_layers",)}
HEAD_OPTIONS: HeadOptions = {
    "head": {"out_dim": ("out_dim",), "bottleneck_dim": ("bottleneck_dim",), "use_bn": ("use_bn_in_head",),
             **_SHARED_SIZES},
    "dino_head": {"out_dim": ("out_dim",), "bottleneck_dim": ("bottleneck_dim",), **_SHARED_SIZES},
    "ibot_head": {"out_dim": ("ibot_out_dim",), "bottleneck_dim": ("ibot_bottleneck_dim",), **_SHARED_SIZES},
}
StateDict = Dict[str, torch.Tensor]


def _log(level: int, message: str, *args: Any) -> None:
    if distributed.is_main_process():
        logger.log(level, message, *args)


@dataclass
class PretrainedHeads:
    """The projection heads of the network model.pretrained holds, by their name in the file (head, dino_head,
    ibot_head), each as the head's own state dict (mlp.*, last_layer.weight_g / weight_v)."""

    source: str
    heads: Dict[str, StateDict] = field(default_factory=dict)

    def restore(self, network: nn.Module, names: List[str], options: Optional[HeadOptions] = None) -> List[str]:
        """Load the file's heads into network.<name> for each name (HEAD_SOURCES says which of the file's); returns
        the names restored. A head of other sizes is a CheckpointError naming the key, the shapes and the options
        (`options`, HEAD_OPTIONS by default) that would make it fit: trained heads are never dropped silently.
        What starts fresh, and what of the file is left out, is logged."""
        restored, fresh, used = [], [], set()
        for name in names:
            found = next((key for key in HEAD_SOURCES[name] if key in self.heads), None)
            if found is None:
                fresh.append(name)
                continue
            module = getattr(network, name)
            _check_head_fits(module, self.heads[found], found, name, self.source, (options or HEAD_OPTIONS)[name])
            module.load_state_dict(self.heads[found])
            restored.append(name if found == name else f"{name} (the file's {found})")
            used.add(found)
        if not self.heads:
            _log(logging.WARNING, "model.pretrained %s holds no projection heads: %s start fresh (with a trained "
                 "backbone, objective.freeze_backbone_epochs keeps it still while they settle)", self.source,
                 ", ".join(names))
            return []
        if restored:
            _log(logging.INFO, "model.pretrained %s: restored the projection head(s) %s", self.source,
                 ", ".join(restored))
        if fresh:
            _log(logging.WARNING, "model.pretrained %s has no %s: it starts fresh", self.source, " or ".join(fresh))
        left = sorted(set(self.heads) - used)
        if left:
            _log(logging.INFO, "model.pretrained %s: the file's %s left out (this recipe has no such head)",
                 self.source, ", ".join(left))
        return [name for name in names if name not in fresh]


def _head_sizes(state: StateDict) -> Dict[str, Any]:
    """The sizes of a DINOHead state dict: out_dim, bottleneck_dim, hidden_dim (None for one layer), head_layers,
    use_bn."""
    linears = sorted((k for k, v in state.items() if k.startswith("mlp.") and k.endswith(".weight") and v.dim() == 2),
                     key=lambda k: int(k.split(".")[1]) if k.count(".") == 2 else 0)
    last = state["last_layer.weight_v"]
    return {"out_dim": last.shape[0], "bottleneck_dim": last.shape[1], "head_layers": len(linears),
            "hidden_dim": state[linears[0]].shape[0] if len(linears) > 1 else None,
            "use_bn": any(k.endswith("running_mean") for k in state)}


def _check_head_fits(module: nn.Module, state: StateDict, found: str, name: str, source: str,
                     options: Dict[str, Tuple[str, ...]]) -> None:
    own = module.state_dict()
    shapes = [f"{key} {list(state[key].shape)} in the file, {list(value.shape)} here" for key, value in own.items()
              if key in state and state[key].shape != value.shape]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    problems = shapes[:3] + ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
        [f"unexpected {', '.join(extra[:3])}"] if extra else [])
    if not problems:
        return
    theirs, ours = _head_sizes(state), _head_sizes(own)
    differing = [size for size in theirs if theirs[size] != ours[size]]
    settings = [f"objective.{option}={str(theirs[size]).lower()}" for size in differing
                for option in options.get(size, ())]
    fits = all(size in options for size in differing) and settings
    fix = (f"set {' '.join(settings)} to continue with the file's head, or " if fits else "")
    raise CheckpointError(
        f"model.pretrained {source}: its {found} does not fit this recipe's {name} ({'; '.join(problems)}): {fix}"
        "set objective.restore_heads=false to start fresh heads on its backbone")


def _select(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _network_with_heads(obj: Any, checkpoint_key: Optional[str]) -> Tuple[StateDict, str]:
    """The network whose backbone model.pretrained loads (the same choice as models/checkpoint.py
    extract_state_dict: the teacher by default), with its projection heads, and where it was found."""
    if is_training_checkpoint(obj):
        run = TrainingCheckpoint(obj)
        prefix = f"{checkpoint_key}." if checkpoint_key else run.eval_owner()
        return run.network(prefix), f"training checkpoint -> {prefix.rstrip('.')}"
    if not isinstance(obj, dict):
        return {}, "no network"
    values = list(obj.values())
    bare = any(isinstance(v, torch.Tensor) for v in values) and not any(isinstance(v, dict) for v in values)
    if bare and checkpoint_key is None:
        state, where = obj, "bare state dict"
    else:
        keys = (checkpoint_key,) if checkpoint_key in obj else DEFAULT_KEYS
        found = next((k for k in keys if isinstance(obj.get(k), dict) and obj[k]), None)
        if found is None:
            return {}, "no network"
        state, where = obj[found], f"'{found}'"
    state = {strip_wrappers(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(("teacher.", "student.")) for k in state):  # DINOv2's training `model`: both networks
        role = checkpoint_key if checkpoint_key in ("teacher", "student") else "teacher"
        state, where = _select(state, f"{role}."), f"{where} -> {role}"
    return state, where


def pretrained_heads(model: Any, restore: bool = True) -> Optional[PretrainedHeads]:
    """The projection heads in the file of a run's model section (model.pretrained, model.checkpoint_key): a DINO
    training checkpoint (student / teacher with backbone.* and head.*, DDP's module. prefix allowed), DINOv2's
    teacher_checkpoint.pth (teacher: backbone.*, dino_head.*, ibot_head.*) or a run of this project. None without
    model.pretrained, or when restore is False (objective.restore_heads); no heads for a backbone file (a
    classifier's head.weight is not a projection head)."""
    if not model.pretrained:
        return None
    if not restore:
        _log(logging.INFO, "objective.restore_heads=false: the projection heads start fresh on the backbone of %s",
             model.pretrained)
        return None
    state, where = _network_with_heads(read_checkpoint(model.pretrained), model.checkpoint_key)
    heads = {}
    for name in ("head", "dino_head", "ibot_head"):
        head = {PARAMETRIZED.get(k, k): v for k, v in _select(state, f"{name}.").items()}
        if "last_layer.weight_v" in head:
            heads[name] = head
    return PretrainedHeads(f"{model.pretrained} ({where})", heads)


class CollapseWatch:
    """Warns once (rank 0) when the teacher's targets look collapsed for `patience` optimizer steps in a row:
    uniform (mean entropy above `uniform` of its maximum: the loss then sits at ln K and nothing is learned), or
    one prototype for nearly every image (the most common argmax for more than `one_prototype` of the rows)."""

    def __init__(self, prototypes: int, patience: int = 20, uniform: float = 0.99, one_prototype: float = 0.95):
        self.prototypes, self.patience = prototypes, patience
        self.uniform, self.one_prototype = uniform, one_prototype
        self.since: Optional[int] = None
        self.warned = False

    def update(self, step: int, entropy: float, top_share: float) -> Optional[str]:
        """Feed one step's target statistics; returns the warning when it is given (once)."""
        collapsed = entropy > self.uniform or top_share > self.one_prototype
        if not collapsed:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if self.warned or step - self.since + 1 < self.patience:
            return None
        self.warned = True
        if entropy > self.uniform:
            what = (f"uniform over its {self.prototypes} prototypes (entropy {100 * entropy:.1f}% of the maximum; the "
                    f"loss sits near ln {self.prototypes} = {math.log(self.prototypes):.2f})")
        else:
            what = f"one prototype for {100 * top_share:.0f}% of the images"
        message = (f"the teacher looks collapsed since step {self.since + 1}: its targets are {what}. Training goes "
                   "on, but the features stop improving. Likely causes: a learning rate too high for the batch "
                   "(optim.lr), too little warm-up (optim.warmup_epochs), a teacher temperature too high "
                   "(objective.teacher_temp) or an EMA momentum too low (objective.momentum_teacher); resume from an "
                   "earlier kept checkpoint (train.save_every_epochs) with a lower optim.lr")
        if distributed.is_main_process():
            logger.warning(message)
        return message
