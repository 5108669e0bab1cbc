"""Hugging Face Transformers' layout of the ViT families, both ways: parameter names and the config.json of a folder.

Transformers holds DINO's backbones as `ViTModel` (facebook/dino-vits16, ...), DeiT's as `ViTForImageClassification`
(plain) and `DeiTModel` / `DeiTForImageClassificationWithTeacher` (distilled), DINOv2's as `Dinov2Model` and
`Dinov2WithRegistersModel` (models/{vit,deit,dinov2,dinov2_with_registers}/modeling_*.py). Its files store the
names that `save_pretrained` writes (`encoder.layer.N.attention.attention.query.weight`, ...); transformers 5
renames them when loading (conversion_mapping.py), and its in-memory names (`attention.q_proj`, `layers.N.`,
`mlp.gate_proj`) are read here too. Queries, keys and values are separate matrices there, one `qkv` here.

Reading a folder rebuilds the network from config.json with Transformers' numerics: its layer-norm epsilon (1e-12
by default for ViT and DeiT, 1e-6 in the official models) and its resizing of position embeddings (bicubic to the
exact grid; antialiased for DINOv2 with registers only). Writing one (`distill export --to hf`) gives config.json
the network's own values and the registry name it was built from (DISTILL_ENTRY), so that reading it back rebuilds
exactly it. Transformers' ViTModel and DeiTModel add a pooler (tanh of a dense layer) that the official models do
not have: files without it load with a freshly initialised one unless add_pooling_layer=False, as Transformers'
own DINO folders do; DINOv2's pooler is the normalised class token and has no weights.
"""

import inspect
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from distill.errors import CheckpointError, InputError
from distill.models.registry import backbone_kwargs, get_spec

StateDict = Dict[str, torch.Tensor]

PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PREPROCESSOR_FILE = "preprocessor_config.json"

# The classes this module writes and reads: (Transformers class, base-model prefix, heads as (theirs, ours)).
HF_CLASSES = {
    "ViTModel": ("", ()),
    "ViTForImageClassification": ("vit.", (("classifier", "head"),)),
    "DeiTModel": ("", ()),
    "DeiTForImageClassificationWithTeacher": ("deit.", (("cls_classifier", "head"), ("distillation_classifier",
                                                                                      "head_dist"))),
    "Dinov2Model": ("", ()),
    "Dinov2WithRegistersModel": ("", ()),
}
DINOV2_CLASSES = ("Dinov2Model", "Dinov2WithRegistersModel")

# Per block: Transformers' suffix (files, then transformers 5's in-memory names) -> ours. q/k/v, SwiGLU's two input
# halves and the ViT/Dinov2 naming differences are handled beside this table.
_BLOCK_NAMES = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "norm1": "norm1",
    "norm2": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}
_EMBEDDING_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
        "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_SWIGLU_HALVES = {"mlp.gate_proj": 0, "mlp.up_proj": 1}


# ---------------------------------------------------------------------------------------------- Transformers -> ours


def hf_prefix(state: StateDict) -> Optional[str]:
    """The prefix before `embeddings.` in a Transformers state dict ("", "vit.", "deit.", "dinov2.", ...), or None
    when the keys are not in Transformers' layout."""
    for key in state:
        if key.endswith(PATCH_WEIGHT):
            return key[: -len(PATCH_WEIGHT)]
    return None


def is_hf_state(state: StateDict) -> bool:
    return hf_prefix(state) is not None


def _block_from_hf(index: str, suffix: str, kind: str, value: torch.Tensor, parts: Dict[str, Dict[int, Any]],
                   out: StateDict) -> bool:
    """Put one block tensor under our name (q/k/v and SwiGLU halves wait in `parts`); False if unknown."""
    if suffix in _QKV:
        parts.setdefault(f"blocks.{index}.attn.qkv.{kind}", {})[_QKV[suffix]] = value
    elif suffix in _SWIGLU_HALVES:
        parts.setdefault(f"blocks.{index}.mlp.w12.{kind}", {})[_SWIGLU_HALVES[suffix]] = value
    elif suffix in _BLOCK_NAMES:
        name = _BLOCK_NAMES[suffix]
        out[f"blocks.{index}.{name}.{'gamma' if kind == 'lambda1' else kind}"] = value
    else:
        return False
    return True


def from_hf(state: StateDict) -> Tuple[StateDict, List[str]]:
    """A Transformers ViT / DeiT / DINOv2 state dict in this package's names; returns it and what was changed.

    Heads: `classifier` and `cls_classifier` become `head`, `distillation_classifier` `head_dist`; the pooler
    (tanh of a dense layer on the class token, which the official models do not have) is left out.
    """
    prefix = hf_prefix(state)
    if prefix is None:
        raise CheckpointError("not a Transformers ViT state dict: no embeddings.patch_embeddings.projection.weight")
    out: StateDict = {}
    parts: Dict[str, Dict[int, torch.Tensor]] = {}
    unknown, notes = [], [f"converted Transformers' layout{f' (prefix {prefix!r})' if prefix else ''}"]
    heads = {theirs: ours for _, names in HF_CLASSES.values() for theirs, ours in names}
    for key, value in state.items():
        inner = key[len(prefix):] if key.startswith(prefix) else key
        head = inner.split(".", 1)[0]
        if inner in _EMBEDDING_NAMES:
            out[_EMBEDDING_NAMES[inner]] = value
        elif head in heads:  # the heads sit beside the base model, outside its prefix
            out[heads[head] + inner[len(head):]] = value
        elif head == "pooler":
            notes.append("left out Transformers' pooler (not part of the official models)")
        else:
            match = _BLOCK_KEY.match(inner)
            if not (match and _block_from_hf(*match.groups(), value, parts, out)):
                unknown.append(key)
    for name, pieces in parts.items():
        out[name] = torch.cat([pieces[i] for i in sorted(pieces)], dim=0)
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)  # ViT's is [1, 1, D], DINOv2's (and ours) [1, D]
    if unknown:
        # Kept under their own names: the strict check that follows names them as unexpected keys.
        out.update({key: state[key] for key in unknown})
    return out, sorted(set(notes))


# ---------------------------------------------------------------------------------------------- ours -> Transformers


def hf_class_for(config: Dict[str, Any]) -> str:
    """The Transformers class that holds a ViT built with these constructor arguments (VisionTransformer.config).

    LayerScale, SwiGLU or registers make it DINOv2's class; a distillation token DeiT's; else ViT's. Combinations
    no Transformers class computes (a distilled DINOv2, a DINOv2 with a linear head on its class token) are refused.
    """
    registers, distilled = config.get("num_register_tokens", 0), config.get("distilled", False)
    classes = config.get("num_classes", 0)
    dinov2_like = bool(registers) or config.get("ffn_layer", "mlp") == "swiglu" or bool(config.get("layerscale_init"))
    if dinov2_like and distilled:
        raise InputError("Transformers has no class for a ViT with a distillation token and LayerScale, SwiGLU or "
                         "registers: export it to safetensors or onnx instead")
    if dinov2_like and classes:
        raise InputError("Transformers' DINOv2 classifier reads the class and mean patch tokens, not this head on the "
                         "class token: export the backbone (--no-head), or export to safetensors or onnx")
    if registers:
        return "Dinov2WithRegistersModel"
    if dinov2_like:
        return "Dinov2Model"
    if distilled:
        return "DeiTForImageClassificationWithTeacher" if classes else "DeiTModel"
    return "ViTForImageClassification" if classes else "ViTModel"


def to_hf(state: StateDict, hf_class: str) -> StateDict:
    """Our ViT state dict in the names `save_pretrained` writes for `hf_class` (one of HF_CLASSES)."""
    prefix, head_names = HF_CLASSES[hf_class]
    dinov2 = hf_class in DINOV2_CLASSES
    head_to_hf = {ours: theirs for theirs, ours in head_names}
    embedding_to_hf = {ours: theirs for theirs, ours in _EMBEDDING_NAMES.items()}
    base: StateDict = {}
    heads: StateDict = {}
    for key, value in state.items():
        block = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        module, _, rest = key.partition(".")
        if block:
            base.update(_block_to_hf(*block.groups(), value, dinov2))
        elif module in head_to_hf:
            heads[f"{head_to_hf[module]}.{rest}"] = value
        elif key == "mask_token":
            if dinov2:  # ViT and DeiT files hold none: it only serves masked training
                base["embeddings.mask_token"] = value.reshape(1, -1)
        elif key in embedding_to_hf:
            base[embedding_to_hf[key]] = value
        else:
            raise CheckpointError(f"{hf_class} has no place for {key!r}")
    if dinov2:
        like = state["cls_token"]
        base.setdefault("embeddings.mask_token", torch.zeros(1, like.shape[-1], dtype=like.dtype))
        _add_unit_layerscale(base, state)
    return {**{prefix + k: v for k, v in base.items()}, **heads}


def _block_to_hf(index: str, name: str, kind: str, value: torch.Tensor, dinov2: bool) -> StateDict:
    """One block tensor of ours under Transformers' legacy file names."""
    base = f"encoder.layer.{index}."
    if name == "attn.qkv":
        q, k, v = value.chunk(3, dim=0)
        # clones: views of one tensor would share its storage, which safetensors refuses to write
        return {f"{base}attention.attention.{part}.{kind}": t.clone() for part, t in zip(("query", "key", "value"),
                                                                                           (q, k, v))}
    names = {"attn.proj": "attention.output.dense", "ls1": "layer_scale1", "ls2": "layer_scale2",
             "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"}
    names.update({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if dinov2 else
                 {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                  "mlp.fc2": "output.dense"})
    if name not in names or (not dinov2 and name in ("ls1", "ls2", "mlp.w12", "mlp.w3")):
        raise CheckpointError(f"no Transformers name for blocks.{index}.{name}.{kind} in a ViT/DeiT model")
    return {f"{base}{names[name]}.{'lambda1' if kind == 'gamma' else kind}": value}


def _add_unit_layerscale(out: StateDict, state: StateDict) -> None:
    """Transformers' DINOv2 blocks always scale their branches: a model without LayerScale gets scales of one."""
    dim = state["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    for index in blocks:
        for which in (1, 2):
            out.setdefault(f"encoder.layer.{index}.layer_scale{which}.lambda1",
                           torch.ones(dim, dtype=state["cls_token"].dtype))


# ---------------------------------------------------------------------------------------------- folders


def is_hf_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def hf_weight_files(folder) -> List[Path]:
    """The weight files of a Transformers folder: model.safetensors or pytorch_model.bin, or the shards an index
    lists."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as error:
                raise CheckpointError(f"cannot read the shard index {index} ({error})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder} lacks the shard(s) {', '.join(missing)} that {name} lists")
            return [folder / s for s in shards]
    raise CheckpointError(f"{folder} is a folder without {' or '.join(WEIGHT_FILES)}: give a checkpoint file, or a "
                          "Transformers folder written by save_pretrained")


def read_hf_config(folder) -> Dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path} ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a Transformers config (a JSON object)")
    return config


SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1536: "giant2"}
SIZE_LETTERS = {"small": "s", "base": "b", "large": "l", "giant2": "g"}
# Written into config.json by `distill export --to hf`: the registry name and overrides of the exported model, so
# that reading the folder back rebuilds exactly it (Transformers keeps unknown config entries).
DISTILL_ENTRY = "distill_backbone"


def _registry_name(model_type: str, architecture: str, dim: int, patch: int, image: int) -> Tuple[str, bool]:
    """(the registered name whose defaults are closest, whether the model classifies) of a Transformers ViT."""
    size = SIZE_NAMES.get(dim, "base")
    deit_size = size if size in ("tiny", "small", "base") else "base"
    resolution = 384 if image == 384 and deit_size == "base" else 224
    if model_type in ("dinov2", "dinov2_with_registers"):
        registers = "_reg" if model_type == "dinov2_with_registers" else ""
        return f"dinov2_vit{SIZE_LETTERS.get(size, 'b')}14{registers}", False
    if model_type == "deit":  # always distilled in Transformers; the heads of ...WithTeacher are ours
        return f"deit_{deit_size}_distilled_patch16_{resolution}", architecture.endswith("WithTeacher")
    if architecture == "ViTForImageClassification":  # DeiT without distillation, as Transformers holds it
        return f"deit_{deit_size}_patch16_{resolution}", True
    if size in ("small", "base") and patch in (8, 16):  # DINO's backbones are ViTModel
        return f"dino_vit{SIZE_LETTERS[size]}{patch}", False
    return f"vit_{size}", False


def registered_arguments(name: str) -> Dict[str, Any]:
    """Every constructor argument of a registered name: its registered values over the constructor's defaults."""
    spec = get_spec(name)
    defaults = {k: p.default for k, p in inspect.signature(spec.factory.__init__).parameters.items() if k != "self"}
    return {**defaults, **backbone_kwargs(name)}


def same_argument(a: Any, b: Any) -> bool:
    """Whether two constructor values are equal; an int image size equals the square pair of it."""
    a, b = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (a, b))
    if isinstance(a, tuple) != isinstance(b, tuple):
        a, b = (v if isinstance(v, tuple) else (v, v) for v in (a, b))
    return a == b


def backbone_from_hf_folder(path) -> Tuple[str, Dict[str, Any]]:
    """(registry name, overrides) that rebuild the network of a Transformers folder from its config.json.

    DINO's ViTModel, DeiT's classes and DINOv2's (with or without registers) map to their families; sizes and
    options that differ from the registered defaults become overrides. A folder `distill export` wrote names its
    backbone itself.
    """
    config = read_hf_config(path)
    own = config.get(DISTILL_ENTRY)
    if isinstance(own, dict) and isinstance(own.get("name"), str):
        overrides = dict(own.get("overrides") or {})
        if isinstance(overrides.get("img_size"), list):
            overrides["img_size"] = tuple(overrides["img_size"])
        backbone_kwargs(own["name"], **overrides)  # an unknown name or option is refused here
        return own["name"], overrides
    model_type = config.get("model_type", "")
    if model_type not in ("vit", "deit", "dinov2", "dinov2_with_registers"):
        raise CheckpointError(f"{path}: Transformers model_type {model_type!r} is not a ViT of DINO, DeiT or "
                              "DINOv2 (vit, deit, dinov2 or dinov2_with_registers)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: hidden_act {config['hidden_act']!r}, but these ViTs use exact GELU ('gelu')")
    architecture = (config.get("architectures") or [""])[0]
    dim, patch = int(config.get("hidden_size", 768)), int(config.get("patch_size", 16))
    image = config.get("image_size", 224)
    image = tuple(int(v) for v in image) if isinstance(image, (list, tuple)) else int(image)
    name, classifies = _registry_name(model_type, architecture, dim, patch, image if isinstance(image, int) else 0)
    wanted: Dict[str, Any] = dict(
        embed_dim=dim, depth=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)), patch_size=patch, img_size=image,
        in_chans=int(config.get("num_channels", 3)), qkv_bias=bool(config.get("qkv_bias", True)),
        norm_eps=float(config.get("layer_norm_eps", 1e-6 if model_type.startswith("dinov2") else 1e-12)),
        num_classes=len(config.get("id2label") or {}) if classifies else 0,
    )
    if model_type.startswith("dinov2"):
        wanted.update(mlp_ratio=float(config.get("mlp_ratio", 4)), mask_token=True,
                      ffn_layer="swiglu" if config.get("use_swiglu_ffn") else "mlp",
                      num_register_tokens=int(config.get("num_register_tokens", 0)))
    else:
        wanted.update(mlp_ratio=int(config.get("intermediate_size", 4 * dim)) / dim, mask_token=False,
                      ffn_layer="mlp", layerscale_init=None, num_register_tokens=0, distilled=model_type == "deit")
    # Transformers resizes position embeddings to the exact grid, antialiased only for DINOv2 with registers
    wanted.update(interpolate_offset=0.0, interpolate_antialias=model_type == "dinov2_with_registers")
    current = registered_arguments(name)
    return name, {k: v for k, v in wanted.items() if not same_argument(v, current[k])}


def hf_normalisation(path) -> Optional[Tuple[List[float], List[float]]]:
    """(mean, std) of a Transformers folder's preprocessor_config.json, or None without one."""
    file = Path(path) / PREPROCESSOR_FILE
    if not file.is_file():
        return None
    try:
        processor = json.loads(file.read_text())
        return [float(v) for v in processor["image_mean"]], [float(v) for v in processor["image_std"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- writing folders

# Constructor arguments that only matter while training: left out of what rebuilds an exported network.
TRAINING_ONLY = ("drop_path_rate", "drop_path_uniform", "drop_path_mode", "attn_backend")
# Transformers' config class of each model_type (transformers.models.*.configuration_*).
CONFIG_CLASSES = {"vit": "ViTConfig", "deit": "DeiTConfig", "dinov2": "Dinov2Config",
                  "dinov2_with_registers": "Dinov2WithRegistersConfig"}


def own_overrides(name: str, config: Dict[str, Any]) -> Dict[str, Any]:
    """The constructor values of a built network (its .config) that differ from the registered ones of `name`, as
    plain JSON values: with the name, what rebuilds exactly that network."""
    registered = registered_arguments(name)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
            if k in registered and k not in TRAINING_ONLY and not same_argument(v, registered[k])}


def hf_config(config: Dict[str, Any], hf_class: str) -> Tuple[str, Dict[str, Any]]:
    """(model_type, keyword arguments of its Transformers config class) for a ViT built with `config` and held by
    `hf_class` (hf_class_for). Layer-norm epsilon, sizes and options are this network's own: Transformers' ViT and
    DeiT default to an epsilon of 1e-12, the official models use 1e-6."""
    height, width = config["img_size"]
    dim = int(config["embed_dim"])
    kwargs: Dict[str, Any] = dict(
        hidden_size=dim, num_hidden_layers=int(config["depth"]), num_attention_heads=int(config["num_heads"]),
        hidden_act="gelu", layer_norm_eps=float(config["norm_eps"]),
        image_size=int(height) if height == width else [int(height), int(width)],
        patch_size=int(config["patch_size"]), num_channels=int(config["in_chans"]), qkv_bias=bool(config["qkv_bias"]),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if hf_class in DINOV2_CLASSES:
        model_type = "dinov2_with_registers" if hf_class == "Dinov2WithRegistersModel" else "dinov2"
        ratio = float(config["mlp_ratio"])
        if not ratio.is_integer():
            raise InputError(f"Transformers' DINOv2 config takes a whole mlp_ratio, this network's is {ratio:g}: "
                             "export it to safetensors or onnx instead")
        kwargs.update(mlp_ratio=int(ratio), use_swiglu_ffn=config["ffn_layer"] == "swiglu",
                      layerscale_value=float(config.get("layerscale_init") or 1.0), drop_path_rate=0.0)
        if config.get("num_register_tokens"):
            kwargs["num_register_tokens"] = int(config["num_register_tokens"])
    else:
        model_type = "deit" if hf_class.startswith("DeiT") else "vit"
        kwargs["intermediate_size"] = int(dim * config["mlp_ratio"])
    if config.get("num_classes"):
        kwargs["num_labels"] = int(config["num_classes"])
    return model_type, kwargs


def hf_config_json(model_type: str, kwargs: Dict[str, Any], hf_class: str, extra: Dict[str, Any]) -> Dict[str, Any]:
    """config.json as Transformers' save_pretrained writes it, for a machine without Transformers: the entries
    Transformers reads (num_labels spelled as id2label / label2id), the class and model_type, and `extra`."""
    entries = {k: v for k, v in kwargs.items() if k != "num_labels"}
    if "num_labels" in kwargs:
        labels = [f"LABEL_{i}" for i in range(kwargs["num_labels"])]
        entries["id2label"] = {str(i): label for i, label in enumerate(labels)}
        entries["label2id"] = {label: i for i, label in enumerate(labels)}
    return {"architectures": [hf_class], "model_type": model_type, **entries, **extra}


def preprocessor_config(mean: List[float], std: List[float], size: Tuple[int, int]) -> Dict[str, Any]:
    """preprocessor_config.json of ViTImageProcessor: resize whole to `size` (bicubic), scale to [0, 1],
    normalise with the network's mean and std."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": int(size[0]), "width": int(size[1])}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [float(v) for v in mean],
            "image_std": [float(v) for v in std]}
