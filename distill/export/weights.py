"""A network of any checkpoint written for other tools: safetensors in the official layout, timm's layout with the
pretrained config timm needs, and a folder Hugging Face Transformers loads.

- safetensors: the state dict under the official names (this package's ViT names are DINO's, DeiT's and DINOv2's
  own), with the registry name, overrides, mean, std and image size in the header, so that `distill` rebuilds the
  network from the file alone (eval/loading.py reads the header back).
- timm: the names timm's VisionTransformer uses for DINO (vit_*_224.dino), DeiT (deit_*) and DINOv2
  (vit_*_patch14[_reg4]_dinov2), and a JSON sidecar `<output>.json` with the timm model name, the keyword arguments
  of a non-default size and the pretrained config (file, mean, std, input_size, num_classes) that
  `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=...)` takes.
- hf: config.json, model.safetensors and preprocessor_config.json, as save_pretrained writes them for Dinov2Model,
  Dinov2WithRegistersModel, ViTModel, ViTForImageClassification, DeiTModel or DeiTForImageClassificationWithTeacher
  (models/hf_layout.py). config.json is written by Transformers' own config class when transformers is installed,
  by hand in the same schema otherwise: the folder is complete either way, loading it needs transformers.

Every output is written beside its target and renamed over it, so an export that fails leaves nothing behind and
an existing output intact. An existing output is refused unless overwrite=True.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from distill.errors import InputError
from distill.eval.loading import export_metadata, load_network
from distill.files import atomic_write, atomic_write_text
from distill.models.hf_layout import (
    CONFIG_CLASSES, CONFIG_FILE, DISTILL_ENTRY, PREPROCESSOR_FILE, hf_class_for, hf_config, hf_config_json,
    own_overrides, preprocessor_config, registered_arguments, same_argument, to_hf,
)
from distill.models.layers.mlp import swiglu_hidden_features
from distill.models.vit import VisionTransformer

StateDict = Dict[str, torch.Tensor]

HF_WEIGHTS = "model.safetensors"


@dataclass
class Exportable:
    """A loaded network with what describes it outside this package."""

    model: nn.Module  # in eval mode
    architecture: str  # registry name
    overrides: Dict[str, Any]  # constructor values that differ from the registered ones (plain JSON values)
    mean: List[float]
    std: List[float]
    image_size: Tuple[int, int]  # the size it is evaluated at
    classifier: bool
    source: str
    notes: List[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        distilled = bool(getattr(self.model, "config", {}).get("distilled"))
        return ("distilled classifier" if distilled else "classifier") if self.classifier else "backbone"

    @property
    def in_chans(self) -> int:
        return int(getattr(self.model, "config", {}).get("in_chans", 3))


def load_exportable(checkpoint, backbone: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                    checkpoint_key: Optional[str] = None, image_size: Optional[Sequence[int]] = None,
                    heads: bool = True) -> Exportable:
    """The network of any checkpoint `distill` loads: the classifier when the weights hold one (DeiT's files and
    runs), else the backbone (heads=False: always the backbone).

    image_size (H, W): the size the network is evaluated at (and traced at, for ONNX); a ViT is built for it, its
    position embedding resized once, here. Default: the run's evaluation size, or the model's own.
    """
    image_size = tuple(int(v) for v in image_size) if image_size is not None else None
    model, setup, classifies = load_network(checkpoint, backbone, overrides, checkpoint_key, heads=heads,
                                            image_size=image_size)
    config = getattr(model, "config", None)
    own = own_overrides(setup.backbone, config) if isinstance(config, dict) else dict(setup.overrides)
    size = image_size or (setup.image_size, setup.image_size)
    mean, std = setup.mean, setup.std
    channels = int(config.get("in_chans", 3)) if isinstance(config, dict) else 3
    if channels != len(mean) and len(mean) != 1:  # a grey network without a run saying how it sees: one value each
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return Exportable(model, setup.backbone, own, list(mean), list(std), size, classifies, setup.source, setup.notes)


# ---------------------------------------------------------------------------------------------- outputs


def check_output(path, overwrite: bool, folder: bool = False) -> Path:
    """The output path, refused when something is there already (unless overwrite; an empty folder is fine for a
    folder output) or when it names the wrong kind of thing."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(f"{path} is a folder: give a file name for the output")
    taken = path.exists() and not (folder and path.is_dir() and not any(path.iterdir()))
    if taken and not overwrite:
        raise InputError(f"{path} exists: choose another --output, or pass --force to replace it")
    return path


def float_state(model: nn.Module, fp16: bool = False) -> StateDict:
    """The model's state dict, detached and contiguous on the CPU; floating tensors in float16 with fp16."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if fp16 and value.is_floating_point():
            value = value.half()
        out[key] = value.contiguous()
    return out


def _safetensors_bytes(state: StateDict, metadata: Dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def write_staged(path, write: Callable[[Path], Any], overwrite: bool = False) -> Any:
    """write(target) into a staging folder beside `path`, under `path`'s own name (so that files it names after
    it, as ONNX's external data, keep their names), then every file it wrote moved beside `path`, `path` last.
    On an error the staging folder goes and `path` is left as it was. Returns what write returned."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{os.getpid()}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        result = write(staging / path.name)
        written = sorted(p for p in staging.iterdir() if p.is_file())
        if staging / path.name not in written:
            raise InputError(f"the export wrote no {path.name}")
        for file in sorted(written, key=lambda p: p.name == path.name):
            os.replace(file, path.parent / file.name)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_folder(folder: Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    """fill(staging folder) beside `folder`, then the staging folder renamed to `folder` (an existing one moved
    aside first and removed after)."""
    folder = check_output(folder, overwrite, folder=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.staging"
    old = folder.parent / f".{folder.name}.{os.getpid()}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        fill(staging)
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if folder.exists() or folder.is_symlink():
            os.replace(folder, old)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()
    return folder


# ---------------------------------------------------------------------------------------------- safetensors


def write_safetensors(item: Exportable, path, fp16: bool = False, overwrite: bool = False) -> Path:
    """The bare state dict in the official layout, with the header that rebuilds the network (see module doc)."""
    path = check_output(path, overwrite)
    metadata = export_metadata(item.architecture, item.overrides, item.mean, item.std, item.image_size,
                               getattr(item.model, "num_classes", 0) or 0)
    payload = _safetensors_bytes(float_state(item.model, fp16), metadata)
    return atomic_write(path, lambda handle: handle.write(payload))


# ---------------------------------------------------------------------------------------------- timm

_DINO = re.compile(r"^dino_vit([sb])(16|8)$")
_DEIT = re.compile(r"^deit_(tiny|small|base)_(?:distilled_)?patch16_(224|384)$")
_DINOV2 = re.compile(r"^dinov2_vit([sblg])14(?:_reg)?$")
_TIMM_CLASSES = 1000  # the classes of timm's plain ViTs (vit_*_patch16_224) when none are given
_GENERIC = re.compile(r"^vit_(tiny|small|base|large)$")  # this package's generic sizes, at any patch size
_TIMM_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
TIMM_SUPPORTED = ("DINO's ViTs (dino_vit[sb]{16,8}), DeiT (deit_*), DINOv2 (dinov2_vit*14, dinov2_vit*14_reg) and "
                  "the generic vit_tiny ... vit_large without registers")
# timm's ViT-g/14 SwiGLU width: int(dim * mlp_ratio) with mlp_ratio 2.66667 * 2 (timm vision_transformer.py)
_TIMM_GIANT_RATIO = 2.66667 * 2


def timm_model_name(architecture: str, config: Dict[str, Any]) -> str:
    """timm's name for a network of this registry name and constructor values (registers and distillation decide
    between timm's variants)."""
    dino, deit, dinov2 = _DINO.match(architecture), _DEIT.match(architecture), _DINOV2.match(architecture)
    registers, distilled = int(config.get("num_register_tokens", 0)), bool(config.get("distilled"))
    if deit and not registers:
        size, resolution = deit.groups()
        return f"deit_{size}_{'distilled_' if distilled else ''}patch16_{resolution}"
    if distilled:
        raise InputError(f"timm has no distilled {architecture}: --to timm exports {TIMM_SUPPORTED} as built")
    if dino and not registers:
        size, patch = dino.groups()
        return f"vit_{_TIMM_SIZES[size]}_patch{patch}_224.dino"
    if dinov2:
        return f"vit_{_TIMM_SIZES[dinov2.group(1)]}_patch14_{'reg4_' if registers else ''}dinov2"
    generic = _GENERIC.match(architecture)
    if generic and not registers:  # timm's plain ViT of that width; depth, patch and size follow as arguments
        return f"vit_{generic.group(1)}_patch16_224"
    raise InputError(f"timm carries no {architecture}: --to timm exports {TIMM_SUPPORTED}; export it --to "
                     "safetensors, hf or onnx instead")


def timm_model_kwargs(architecture: str, config: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of timm.create_model for a network whose constructor values differ from the
    registered (official) ones: depth, width, image size, classes, ..."""
    registered = registered_arguments(architecture)
    if abs(float(config["norm_eps"]) - 1e-6) > 1e-12:
        raise InputError(f"timm's ViTs use a layer-norm epsilon of 1e-6, this network {config['norm_eps']:g}: pass "
                         "--set norm_eps=1.0e-6 to export it with timm's (its outputs change slightly)")
    if config["ffn_layer"] != registered["ffn_layer"]:
        raise InputError(f"timm's {architecture} uses the {registered['ffn_layer']} feed-forward, this network "
                         f"{config['ffn_layer']}: export it --to safetensors, hf or onnx instead")
    kwargs: Dict[str, Any] = {}
    for ours, theirs in (("embed_dim", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads"),
                         ("patch_size", "patch_size"), ("in_chans", "in_chans"), ("qkv_bias", "qkv_bias"),
                         ("num_classes", "num_classes"), ("img_size", "img_size")):
        if not same_argument(config[ours], registered[ours]):
            value = config[ours]
            kwargs[theirs] = (value[0] if value[0] == value[1] else list(value)) if ours == "img_size" else value
    if _GENERIC.match(architecture) and int(config["num_classes"]) != _TIMM_CLASSES:
        kwargs["num_classes"] = int(config["num_classes"])  # timm's plain ViTs are built with ImageNet's head
    if bool(config.get("layerscale_init")) != bool(registered.get("layerscale_init")):
        kwargs["init_values"] = config.get("layerscale_init")
    registers = int(config.get("num_register_tokens", 0))
    if registers and registers != 4:
        kwargs["reg_tokens"] = registers
    dim = int(config["embed_dim"])
    if config["ffn_layer"] == "swiglu":  # timm's GluMlp takes the packed width, int(dim * mlp_ratio)
        hidden = 2 * swiglu_hidden_features(dim, config["mlp_ratio"])
        if int(dim * _TIMM_GIANT_RATIO) != hidden:
            kwargs["mlp_ratio"] = (hidden + 0.5) / dim
    elif not same_argument(config["mlp_ratio"], registered["mlp_ratio"]):
        kwargs["mlp_ratio"] = config["mlp_ratio"]
    return kwargs


def to_timm(state: StateDict, config: Dict[str, Any]) -> StateDict:
    """Our ViT state dict in timm's names: no mask token; registers as reg_token, with the class token's position
    embedding folded into the class token (timm's register models add no position embedding to it, and the class
    position is never resized, so the sum is exact at every size); SwiGLU's w12 / w3 as fc1 / fc2."""
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if config.get("num_register_tokens"):
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = (out["cls_token"].float() + pos[:, :1].float()).to(pos.dtype)
        out["pos_embed"] = pos[:, 1:].clone()
    if config.get("ffn_layer") == "swiglu":
        out = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in out.items()}
    return out


@dataclass
class TimmExport:
    weights: Path
    sidecar: Path
    model_name: str
    model_kwargs: Dict[str, Any]
    pretrained_cfg: Dict[str, Any]

    def usage(self) -> str:
        kwargs = "".join(f", {k}={v!r}" for k, v in self.model_kwargs.items())
        return (f"timm.create_model({self.model_name!r}, pretrained=True, "
                f"pretrained_cfg_overlay=dict(file={str(self.weights)!r}){kwargs})")


def write_timm(item: Exportable, path, fp16: bool = False, overwrite: bool = False) -> TimmExport:
    """timm's layout in `path` (.safetensors, or a torch.save file for any other suffix) and the sidecar
    `<path>.json`: {"model_name", "model_kwargs", "pretrained_cfg", "architecture", "usage"}."""
    if not isinstance(item.model, VisionTransformer):
        raise InputError(f"timm carries no {item.architecture}: --to timm exports {TIMM_SUPPORTED}")
    config = item.model.config
    name = timm_model_name(item.architecture, config)
    kwargs = timm_model_kwargs(item.architecture, config)
    path = Path(path)
    sidecar = Path(f"{path}.json")
    check_output(path, overwrite)
    check_output(sidecar, overwrite)
    state = to_timm(float_state(item.model, fp16), config)
    # input_size is the size the network is built for: timm builds the model at the pretrained config's input size
    pretrained_cfg: Dict[str, Any] = {
        "file": str(path.resolve()), "num_classes": int(config["num_classes"]), "mean": list(item.mean),
        "std": list(item.std), "input_size": [item.in_chans, *config["img_size"]], "interpolation": "bicubic",
    }
    if item.in_chans not in (1, 3):  # timm would otherwise try to adapt the first convolution to the channels
        pretrained_cfg["first_conv"] = None
    export = TimmExport(path, sidecar, name, kwargs, pretrained_cfg)
    description = {"model_name": name, "model_kwargs": kwargs, "pretrained_cfg": pretrained_cfg,
                   "architecture": item.architecture, "usage": export.usage() + "  # or pretrained_cfg_overlay="
                   "<this file's pretrained_cfg>, **<its model_kwargs>"}
    if path.suffix == ".safetensors":
        payload = _safetensors_bytes(state, {"format": "pt"})
        atomic_write(path, lambda handle: handle.write(payload))
    else:
        atomic_write(path, lambda handle: torch.save(state, handle))
    atomic_write_text(sidecar, json.dumps(description, indent=2) + "\n")
    return export


# ---------------------------------------------------------------------------------------------- Transformers


@dataclass
class HfExport:
    folder: Path
    hf_class: str
    model_type: str
    with_transformers: bool  # whether transformers' config class wrote config.json


def _write_hf_config(folder: Path, model_type: str, kwargs: Dict[str, Any], hf_class: str,
                     extra: Dict[str, Any], dtype: str) -> bool:
    """config.json through transformers' config class if it is installed (True), else by hand (False)."""
    try:
        import transformers
    except ImportError:
        entries = hf_config_json(model_type, kwargs, hf_class, {**extra, "dtype": dtype})
        atomic_write_text(folder / CONFIG_FILE, json.dumps(entries, indent=2, sort_keys=True) + "\n")
        return False
    major = int(transformers.__version__.split(".")[0])
    config = getattr(transformers, CONFIG_CLASSES[model_type])(**kwargs, **{"dtype" if major >= 5 else
                                                                               "torch_dtype": dtype})
    config.architectures = [hf_class]
    for key, value in extra.items():
        setattr(config, key, value)
    config.save_pretrained(str(folder))
    return True


def write_hf(item: Exportable, folder, fp16: bool = False, overwrite: bool = False) -> HfExport:
    """A folder Transformers' from_pretrained loads (see module doc); config.json also names the registry name and
    overrides (DISTILL_ENTRY), so that `distill` rebuilds exactly this network from the folder."""
    if not isinstance(item.model, VisionTransformer):
        raise InputError(f"Transformers holds no {item.architecture} here: --to hf exports the ViTs of DINO, DeiT "
                         "and DINOv2; export it --to safetensors or onnx instead")
    config = item.model.config
    hf_class = hf_class_for(config)
    model_type, kwargs = hf_config(config, hf_class)
    state = to_hf(float_state(item.model, fp16), hf_class)
    # DINOv2 is evaluated at its crop size (224) while built for 518; ViT and DeiT need their own size.
    size = item.image_size if model_type.startswith("dinov2") else tuple(config["img_size"])
    extra = {DISTILL_ENTRY: {"name": item.architecture, "overrides": item.overrides}}
    used: List[bool] = []

    def fill(staging: Path) -> None:
        used.append(_write_hf_config(staging, model_type, kwargs, hf_class, extra, "float16" if fp16 else "float32"))
        payload = _safetensors_bytes(state, {"format": "pt"})
        (staging / HF_WEIGHTS).write_bytes(payload)
        processor = preprocessor_config(item.mean, item.std, size)
        (staging / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")

    folder = _write_folder(Path(folder), fill, overwrite)
    return HfExport(folder, hf_class, model_type, used[0])
