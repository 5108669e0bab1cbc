"""The schema of a training run: model, data, optimiser, loop, evaluation, and the objective's own section.

`distill train CONFIG key=value ...` merges the schema's defaults, the YAML recipe and the overrides; the
`objective.name` chosen in the recipe or on the command line decides which objective section is validated.
"""

from dataclasses import dataclass, field
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf

from distill.config import load_config
from distill.data.configs import DatasetConfig
from distill.errors import InputError, UnknownConfigKey
from distill.objectives import ObjectiveConfig, objective_config_class
from distill.precision import PRECISIONS

OPTIMIZERS = ("adamw", "sgd", "lars")  # AdamW for ViTs; SGD and LARS for ResNets (DINO's choices)


@dataclass
class ModelConfig:
    backbone: str = "vit_small"
    overrides: Dict[str, Any] = field(default_factory=dict)  # create_backbone arguments, e.g. drop_path_rate
    pretrained: Optional[str] = None  # initialise the student (and teacher) from a checkpoint file
    checkpoint_key: Optional[str] = None


@dataclass
class DataConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    batch_size: int = 64  # per process
    num_workers: int = 2


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | lars
    lr: float = 5e-4  # at lr_reference_batch images per step
    lr_scaling: str = "linear"  # linear (DINO, DeiT) | sqrt (DINOv2) | none
    lr_reference_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd and lars
    clip_grad: float = 3.0  # 0: off
    clip_mode: str = "per_param"  # per_param (DINO: each tensor's norm) | global (one norm over all)
    accumulate_steps: int = 1
    exclude_tokens_from_wd: bool = False  # also spare position embedding and tokens (timm); DINO decays them
    layer_decay: float = 1.0  # layer-wise lr decay (DINOv2 0.9): block i gets decay ** (depth - i)
    patch_embed_lr_mult: float = 1.0  # DINOv2: 0.2


@dataclass
class LoopConfig:
    epochs: float = 100.0
    time_limit_minutes: float = 0.0  # > 0: fit the whole schedule into this training time
    max_steps: int = 0  # > 0: stop once this many steps are done in all (schedules unchanged)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # several processes: ddp (each rank holds the networks) | fsdp (each holds a shard)
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0: PyTorch's default)
    output_dir: str = "runs/train"
    save_every_epochs: float = 0.0  # also keep checkpoint_XXXX.pth every N epochs (0: only the latest)
    checkpoint_every_minutes: float = 10.0  # refresh checkpoint.pth at least this often
    log_every_steps: int = 10
    resume: str = "auto"  # auto | never | path of a checkpoint
    nan_policy: str = "stop"  # stop | skip
    max_skipped_steps: int = 20  # with nan_policy=skip, stop after this many non-finite steps in a row


@dataclass
class EvalConfig:
    knn: bool = True  # weighted kNN of the evaluated backbone at the end of training
    knn_at_start: bool = False  # also before training: the randomly initialised (or pretrained) backbone
    knn_every_epochs: float = 0.0
    classify_every_epochs: float = 1.0  # top-1 / top-5 of classifiers (DeiT) on the validation split (0: only at the end)
    raw_pixels: bool = False  # also kNN on raw pixels (in-memory datasets)
    knn_k: List[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    dataset: Optional[DatasetConfig] = None  # labelled data to evaluate on (default: the training data)
    train_split: str = "train"
    val_split: str = "val"  # Fashion-MNIST's is "test"
    train_limit: int = 0
    val_limit: int = 0
    image_size: int = 0  # 0: the global crop size
    batch_size: int = 256
    attention_images: int = 0  # write attention maps of this many validation images at the end


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def validate(self) -> None:
        self.data.dataset.validate("data.dataset")
        if self.eval.dataset is not None:
            self.eval.dataset.validate("eval.dataset")
        self.objective.validate()
        o, t = self.optim, self.train
        choices = {
            "optim.name": (o.name, OPTIMIZERS), "optim.lr_scaling": (o.lr_scaling, ("linear", "sqrt", "none")),
            "optim.clip_mode": (o.clip_mode, ("per_param", "global")), "train.precision": (t.precision, PRECISIONS),
            "train.device": (t.device, ("auto", "cpu", "cuda")), "train.parallel": (t.parallel, ("ddp", "fsdp")),
            "train.nan_policy": (t.nan_policy, ("stop", "skip")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise InputError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
        e = self.eval
        positive = {"data.batch_size": self.data.batch_size, "optim.accumulate_steps": o.accumulate_steps,
                    "train.epochs": t.epochs, "train.log_every_steps": t.log_every_steps,
                    "optim.lr_reference_batch": o.lr_reference_batch, "eval.batch_size": e.batch_size,
                    "eval.knn_temperature": e.knn_temperature, "optim.layer_decay": o.layer_decay}
        for key, value in positive.items():
            if value <= 0:
                raise InputError(f"config key '{key}' must be positive, got {value}")
        nonnegative = {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.warmup_epochs": o.warmup_epochs,
                       "optim.weight_decay": o.weight_decay, "optim.clip_grad": o.clip_grad,
                       "train.time_limit_minutes": t.time_limit_minutes, "train.max_steps": t.max_steps,
                       "optim.layer_decay": o.layer_decay, "optim.patch_embed_lr_mult": o.patch_embed_lr_mult,
                       "data.num_workers": self.data.num_workers, "train.threads": t.threads,
                       "train.save_every_epochs": t.save_every_epochs,
                       "train.checkpoint_every_minutes": t.checkpoint_every_minutes,
                       "eval.train_limit": e.train_limit, "eval.val_limit": e.val_limit,
                       "optim.weight_decay_end": o.weight_decay_end, "train.max_skipped_steps": t.max_skipped_steps,
                       "eval.knn_every_epochs": e.knn_every_epochs, "eval.attention_images": e.attention_images,
                       "eval.image_size": e.image_size, "eval.classify_every_epochs": e.classify_every_epochs}
        for key, value in nonnegative.items():
            if value < 0:
                raise InputError(f"config key '{key}' must be >= 0, got {value}")
        at_most_one = {"optim.layer_decay": o.layer_decay, "optim.momentum": o.momentum}
        for key, value in at_most_one.items():
            if not 0 <= value <= 1:
                raise InputError(f"config key '{key}' must lie in [0, 1], got {value}")
        if len(o.betas) != 2 or not all(0 <= beta < 1 for beta in o.betas):
            raise InputError(f"config key 'optim.betas' is {list(o.betas)}: give two numbers in [0, 1), e.g. "
                             "[0.9, 0.999]")
        if o.min_lr > o.lr:
            raise InputError(f"optim.min_lr ({o.min_lr}) exceeds optim.lr ({o.lr}): the cosine schedule decays from "
                             "lr down to min_lr")
        if self.model.checkpoint_key and not self.model.pretrained:
            raise InputError(f"model.checkpoint_key={self.model.checkpoint_key} picks a network of model.pretrained, "
                             "which is not set: set model.pretrained=FILE, or leave checkpoint_key out")
        if t.resume not in ("auto", "never") and not t.resume.endswith((".pth", ".pt", ".ckpt", ".safetensors")) \
                and not Path(t.resume).is_file():
            raise InputError(f"train.resume={t.resume}: give auto (the run folder's checkpoint), never, or the path "
                             "of a checkpoint file")
        if not self.eval.knn_k or min(self.eval.knn_k) < 1:
            raise InputError(f"config key 'eval.knn_k' is {self.eval.knn_k}: give neighbour counts of at least 1, "
                             "e.g. [10, 20]")
        if t.parallel == "fsdp" and t.precision == "fp16":
            raise InputError("train.parallel=fsdp runs in bf16 or fp32, not fp16: set train.precision=bf16")
        if o.warmup_epochs > t.epochs:
            raise InputError(f"optim.warmup_epochs ({o.warmup_epochs}) exceeds train.epochs ({t.epochs})")


def _objective_name(path: Optional[Union[str, Path]], overrides: Sequence[str]) -> str:
    name = "dino"
    if path is not None and Path(path).is_file():
        try:
            recipe = OmegaConf.load(path)
        except Exception:
            recipe = None  # load_config reports the parse error with its cause
        if not isinstance(recipe, DictConfig):
            recipe = None  # a list: load_config says so
        if recipe is not None and isinstance(recipe.get("objective"), (dict, type(recipe))) and "name" in recipe.objective:
            name = str(recipe.objective.name)
    for item in overrides:
        if item.startswith("objective.name="):
            name = item.split("=", 1)[1]
    return name


def load_train_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- recipe <- overrides, with the section of the chosen objective, validated."""
    name = _objective_name(path, overrides)
    objective = objective_config_class(name)()
    try:
        return load_config(TrainConfig(objective=objective), path, overrides)
    except InputError as error:
        written_for = _objective_name(path, ())
        if written_for != name and str(error).startswith("objective."):
            origin = f"the recipe was written for {written_for}" if path else f"the defaults are {written_for}'s"
            raise InputError(f"{error} ({origin}, and objective.name={name} keeps its objective section: start "
                             f"from a {name} recipe, e.g. under configs/{name}/ or configs/demo/)") from None
        raise _other_objective_hint(error, name) from None


def _other_objective_hint(error: InputError, name: str) -> InputError:
    """An unknown objective.<key> that another objective has: named as that objective's, with the switch."""
    from distill.objectives import OBJECTIVES

    if not isinstance(error, UnknownConfigKey):
        return error
    section, _, key = error.key.partition(".")
    if section != "objective" or "." in key:  # a key of the objective section itself
        return error
    owners = [other for other, (config_class, _) in OBJECTIVES.items()
              if other != name and key in {f.name for f in dataclasses.fields(config_class)}]
    if not owners:
        return error
    return InputError(f"objective.{key} belongs to the {' and '.join(owners)} objective, and this recipe trains "
                      f"{name}: set objective.name={owners[0]} (with a recipe of it, e.g. under configs/{owners[0]}/) "
                      f"or leave objective.{key} out")


def check_data_paths(config: TrainConfig) -> None:
    """The data the run reads exists and is of the kind its section says (before a job is submitted)."""
    config.data.dataset.check_path("data.dataset")
    if config.eval.dataset is not None:
        config.eval.dataset.check_path("eval.dataset")
    for key, path in (("model.pretrained", config.model.pretrained),
                      ("objective.teacher.weights", getattr(getattr(config.objective, "teacher", None), "weights", None))):
        if path and path != "hub" and not Path(path).expanduser().exists():
            raise InputError(f"{key} {path} does not exist: give the checkpoint file to start from")
