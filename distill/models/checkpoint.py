"""Loading backbone weights from the checkpoint files users already have, safely and strictly.

Reading never runs code from the file (`weights_only`). The layouts of the official releases are recognised and
converted to this package's parameter names: bare backbones (DINO's and DINOv2's hub files), DINO training
checkpoints (teacher by default; facebookresearch/dino main_dino.py), DeiT `model` files (facebookresearch/deit),
DINOv2 teacher and training checkpoints with chunked blocks (facebookresearch/dinov2), timm state dicts, Hugging Face
Transformers' files and folders (hf_layout.py) and anything prefixed by DDP, FSDP or torch.compile; and the
training checkpoints `distill train` writes. After conversion every key and shape must match; otherwise one error
lists what differs and which registered name the file looks like.
"""

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from distill.errors import CheckpointError
from distill.models import hf_layout
from distill.models.diagnosis import mismatch_report, perfect_square_root
from distill.models.layers import resize_pos_embed

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# Objects found in official training checkpoints besides tensors (DINO and DeiT store their argparse
# arguments). None of them can run code when rebuilt.
SAFE_GLOBALS = [argparse.Namespace, np.dtype, np.ndarray]
for _name in ("scalar", "_reconstruct"):
    for _module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            SAFE_GLOBALS.append(getattr(__import__(_module, fromlist=[_name]), _name))
            break
        except (ImportError, AttributeError):
            continue

# Top-level entries that hold a network, in the order they are tried when no key is given.
DEFAULT_KEYS = ("teacher", "model", "state_dict", "model_ema", "student")
# Wrapper segments that DDP, FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_SEGMENTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _refused_globals(error: Exception) -> List[str]:
    """Names the restricted unpickler refused to import, or [] if the error is damage, not a refusal."""
    text = str(error)
    names = re.findall(r"GLOBAL ([\w.]+)", text)
    if names or "allowlisted" in text or "is blocked" in text:
        return sorted(set(names)) or ["a Python object that is not a tensor"]
    return []


def read_checkpoint(path: Union[str, Path]) -> Any:
    """The object stored in a .pth/.pt/.safetensors file, read without ever executing code from it; for a folder
    that Transformers' save_pretrained wrote, its weights (model.safetensors, pytorch_model.bin or their shards)."""
    path = Path(path)
    if path.is_dir():
        state: Dict[str, Any] = {}
        for file in hf_layout.hf_weight_files(path):
            state.update(read_checkpoint(file))
        return state
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file): check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            raise CheckpointError(f"cannot read {path} as safetensors: {error}") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, KeyError... depending on the damage
        refused = _refused_globals(error)
        if refused:
            raise CheckpointError(
                f"refusing to load {path}: it holds {', '.join(refused)}, and unpickling that could run code. "
                "Only tensors, "
                "containers and plain values are loaded. If you trust the file, load it with "
                "torch.load(path, weights_only=False) yourself and torch.save() just its state dict"
            ) from None
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        unpickler = [line for line in lines if not line.startswith(("Weights only", "Please file", "Check the"))]
        reason = (unpickler or lines or [type(error).__name__])[0][:160]
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint, or a truncated or corrupt one ({reason})"
        ) from None


# ---------------------------------------------------------------------------------------------- training runs

TRAINING_FORMAT = "distill-train-1"


class TrainingCheckpoint:
    """A checkpoint that `distill train` wrote, read in one place.

    Its entries: format (TRAINING_FORMAT), objective (the objective's state dict: every trained network, keys such
    as "teacher.backbone.blocks.0..."), eval_network (the prefix of the evaluated backbone in it), eval_view (the
    size and normalisation it is evaluated at), optimizer, scaler, step, total_steps, plan_history (the (step, total)
    of each plan, when a time budget changed it), steps_per_epoch,
    train_seconds, rng and config (the resolved run config as plain containers).
    """

    def __init__(self, payload: Dict[str, Any], source: str = "the checkpoint") -> None:
        if not is_training_checkpoint(payload):
            raise CheckpointError(f"{source} is not a distill training checkpoint (no format {TRAINING_FORMAT!r})")
        self.payload, self.source = payload, source

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]

    @property
    def weights(self) -> StateDict:
        """The objective's state dict."""
        return self.payload["objective"]

    @property
    def config(self) -> Dict[str, Any]:
        return self.payload["config"]

    @property
    def eval_network(self) -> str:
        """Where the evaluated backbone sits among the weights, e.g. "teacher.backbone." or "student."."""
        return self.payload["eval_network"]

    def network(self, prefix: str) -> StateDict:
        """The weights under `prefix` ("teacher.", "student.backbone.", ...), the prefix removed."""
        return _select_prefix(self.weights, prefix)

    def networks(self) -> List[str]:
        """The networks the objective holds (the first segment of its keys)."""
        return sorted({k.split(".")[0] for k in self.weights})

    def eval_owner(self) -> str:
        """The prefix of the network that holds the evaluated backbone with its heads ("teacher." for
        "teacher.backbone.")."""
        return self.eval_network.rsplit("backbone.", 1)[0]

    @property
    def backbone(self) -> str:
        """The registry name the run's backbones were built from."""
        return self.config["model"]["backbone"]

    @property
    def backbone_overrides(self) -> Dict[str, Any]:
        return dict(self.config["model"]["overrides"])

    def eval_view(self) -> Dict[str, Any]:
        """{"size", "mean", "std", "resize_ratio"} of the evaluation view the objective declared."""
        stored = self.payload.get("eval_view")
        if stored is not None:
            return dict(stored)
        # files written before eval_view was stored: the views section of the config of the objectives then known
        views = (self.config.get("objective") or {}).get("views") or {}
        size = views.get("global_crops_size") or views.get("input_size")
        crop_pct = views.get("eval_crop_pct")
        return {"size": size, "mean": views.get("mean"), "std": views.get("std"),
                "resize_ratio": 1 / crop_pct if crop_pct else None}


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAINING_FORMAT


def _is_state_dict(obj: Any) -> bool:
    """Tensors at the top level and no nested dicts (a stray number or string beside them is tolerated)."""
    values = obj.values() if isinstance(obj, dict) else ()
    return any(isinstance(v, torch.Tensor) for v in values) and not any(isinstance(v, dict) for v in values)


def strip_wrappers(key: str) -> str:
    """The parameter name without the segments DDP, FSDP, activation checkpointing and torch.compile insert."""
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def flatten_block_chunks(key: str) -> str:
    """DINOv2 trains with block_chunks: [prefix.]blocks.{chunk}.{i}.* where i is already the global block index."""
    return re.sub(r"^((?:\w+\.)*?)blocks\.\d+\.(\d+)\.", r"\1blocks.\2.", key)


def _select_prefix(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def extract_state_dict(obj: Any, checkpoint_key: Optional[str] = None) -> Tuple[StateDict, str]:
    """The backbone's state dict inside a checkpoint object, with its keys unprefixed, and where it was found.

    checkpoint_key picks the network of a training checkpoint: "teacher" (the default when there is one),
    "student", "model", "model_ema", ...
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"the file holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    if is_training_checkpoint(obj):  # this package's own training checkpoints
        return _from_training_checkpoint(TrainingCheckpoint(obj), checkpoint_key)
    role = checkpoint_key if checkpoint_key in ("teacher", "student") else "teacher"
    if _is_state_dict(obj) and checkpoint_key is None:
        state, where = obj, "bare state dict"
    else:
        if checkpoint_key is not None and checkpoint_key not in obj and not (
            checkpoint_key in ("teacher", "student") and "model" in obj
        ):
            raise CheckpointError(
                f"checkpoint_key {checkpoint_key!r} is not in the file; its top-level keys are {sorted(obj)}"
            )
        keys = (checkpoint_key,) if checkpoint_key in obj else DEFAULT_KEYS
        found = next((k for k in keys if isinstance(obj.get(k), dict) and obj[k]), None)
        if found is None:
            raise CheckpointError(
                f"no network weights found: top-level keys are {sorted(obj)[:12]}; expected a state dict or "
                f"one of {', '.join(DEFAULT_KEYS)}"
            )
        state, where = obj[found], f"'{found}'"
    state = {strip_wrappers(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(("teacher.", "student.")) for k in state):  # DINOv2 training `model`: both networks
        state, where = _select_prefix(state, f"{role}."), f"{where} -> {role}"
    if any(k.startswith("backbone.") for k in state):  # drop the projection heads (head, dino_head, ibot_head)
        state, where = _select_prefix(state, "backbone."), f"{where} -> backbone"
    if hf_layout.is_hf_state(state):  # Transformers' ViTModel, DeiT..., Dinov2Model files and folders
        state, _ = hf_layout.from_hf(state)
        where = f"{where} -> Transformers layout"
    state = {flatten_block_chunks(k): v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"the {where} entry of the file holds no tensors")
    return state, where


def _from_training_checkpoint(run: TrainingCheckpoint, checkpoint_key: Optional[str]) -> Tuple[StateDict, str]:
    """The evaluated backbone of a distill training checkpoint (e.g. DINO's teacher), or the network named
    by checkpoint_key ("teacher", "student", ...)."""
    prefix = f"{checkpoint_key}.backbone." if checkpoint_key else run.eval_network
    state = run.network(prefix)
    if not state:
        raise CheckpointError(f"checkpoint_key {checkpoint_key!r}: this training checkpoint holds "
                              f"{', '.join(run.networks())}")
    return state, f"training checkpoint -> {prefix.rstrip('.')}"


# ---------------------------------------------------------------------------------------------- conversion


HEAD_PREFIXES = ("head.", "head_dist.")


def adapt_to_model(state: StateDict, model: torch.nn.Module, new_heads: bool = False) -> Tuple[StateDict, List[str]]:
    """Convert a recognised foreign layout to the model's names; returns the new dict and what was changed.

    new_heads: keep the model's own (freshly initialised) classifier heads instead of the file's, as when
    fine-tuning on a dataset with other classes.
    """
    state = dict(state)
    notes: List[str] = []
    own = model.state_dict()
    if new_heads:
        dropped = [k for k in state if k.startswith(HEAD_PREFIXES)]
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        state.update({k: v.clone() for k, v in own.items() if k.startswith(HEAD_PREFIXES)})
        notes.append(f"new classifier heads ({len(dropped)} tensors of the file left out)")
    n_pos = getattr(model, "num_pos_prefix_tokens", 1)

    if "reg_token" in state:  # timm: registers as reg_token, and no position embedding on the class token
        state["register_tokens"] = state.pop("reg_token")
        pos = state.get("pos_embed")
        if pos is not None and perfect_square_root(pos.shape[1]) is not None:
            state["pos_embed"] = torch.cat([pos.new_zeros(1, n_pos, pos.shape[-1]), pos], dim=1)
        notes.append("converted timm register layout")
    if getattr(model, "config", {}).get("ffn_layer") == "swiglu" and any(".mlp.fc1." in k for k in state):
        state = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in state.items()}
        notes.append("renamed timm SwiGLU fc1/fc2 to w12/w3")
    if getattr(model, "num_classes", 0) == 0:
        heads = [k for k in state if k.startswith(("head.", "head_dist."))]
        for key in heads:
            del state[key]
        if heads:
            notes.append("dropped the classifier heads (the model is built without classes)")
    scales = [k for k in state if re.match(r"blocks\.\d+\.ls[12]\.gamma$", k)]
    if scales and not any(k in own for k in scales) and all(_all_ones(state[k]) for k in scales):
        for key in scales:  # LayerScale of ones (Transformers' DINOv2 always has one) is the identity
            del state[key]
        notes.append("left out LayerScale gains that are all one (the model has no LayerScale)")
    if "mask_token" in own and "mask_token" not in state:
        state["mask_token"] = own["mask_token"].clone()
        notes.append("kept the model's initial mask token (the file has none; it only matters for masked training)")
    elif "mask_token" in state and "mask_token" not in own and set(state) - {"mask_token"} <= set(own):
        # only when the rest fits: a file of another architecture keeps it among the keys the error lists
        del state["mask_token"]
        notes.append("left out the file's mask token (the model has none; it only matters for masked training)")

    pos = state.get("pos_embed")
    if "dist_token" in own and "dist_token" not in state and "cls_token" in state and pos is not None:
        # A plain ViT (DINO, DINOv2, DeiT) starts a distilled student: the distillation token and its position
        # embedding start as copies of the class token's.
        state["dist_token"] = state["cls_token"].clone()
        if perfect_square_root(pos.shape[1] - 1) is not None:
            state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        notes.append("added a distillation token (copied from the class token)")

    proj = state.get("patch_embed.proj.weight")
    own_proj = own.get("patch_embed.proj.weight")
    if proj is not None and own_proj is not None and proj.shape[1] == 3 and own_proj.shape[1] == 1:
        if proj.shape[0] == own_proj.shape[0] and proj.shape[2:] == own_proj.shape[2:]:
            state["patch_embed.proj.weight"] = proj.sum(dim=1, keepdim=True)
            notes.append("summed the RGB patch-embedding filters for 1-channel input")

    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape and pos.shape[-1] == own_pos.shape[-1]:
        side = perfect_square_root(pos.shape[1] - n_pos)
        if side is not None and hasattr(model, "pos_grid"):
            patch_pos = resize_pos_embed(
                pos[:, n_pos:], (side, side), model.pos_grid, model.interpolate_offset, model.interpolate_antialias
            )
            state["pos_embed"] = torch.cat([pos[:, :n_pos], patch_pos], dim=1)
            notes.append(f"resized the position embedding from a {side}x{side} grid to {model.pos_grid}")
    return state, notes


def _all_ones(tensor: torch.Tensor) -> bool:
    """Whether every value is one; False for tensors without values (meta tensors: shapes only)."""
    return not tensor.is_meta and bool((tensor == 1).all())


@dataclass
class LoadReport:
    source: str
    notes: List[str] = field(default_factory=list)


def load_pretrained(
    model: torch.nn.Module,
    checkpoint: Union[str, Path, Dict[str, Any]],
    checkpoint_key: Optional[str] = None,
    label: Optional[str] = None,
    new_heads: bool = False,
) -> LoadReport:
    """Load a checkpoint file (or an already loaded checkpoint dict) into `model`, strictly, after conversion."""
    label = label or (str(checkpoint) if isinstance(checkpoint, (str, Path)) else "the given state dict")
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    state, where = extract_state_dict(obj, checkpoint_key)
    return load_state(model, state, f"{label} ({where})", new_heads)


def load_state(model: torch.nn.Module, state: StateDict, source: str, new_heads: bool = False) -> LoadReport:
    """Load a backbone state dict (already unprefixed) into `model`: converted from a recognised foreign layout,
    then strictly; a file that does not fit raises one error saying what differs and what to use."""
    state, notes = adapt_to_model(state, model, new_heads)
    problem = mismatch_report(state, model, source)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state, strict=True)
    report = LoadReport(source=source, notes=notes)
    logger.info("loaded %s%s", report.source, "".join(f"; {n}" for n in notes))
    return report
