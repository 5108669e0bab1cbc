"""ONNX graphs of the toolkit's backbones and classifiers, checked against PyTorch with onnxruntime.

One input, `images` [batch, in_chans, height, width], with a dynamic batch, height and width: a ViT resizes its
position embedding inside the graph (VisionTransformer.interpolate_pos_encoding switches to
layers/pos_embed.resize_pos_embed_traceable while torch.export traces), so one file serves every image size that
is a multiple of the patch size. Named outputs:

- ViT backbones: `cls_token` [B, D], `patch_tokens` [B, N, D], `register_tokens` [B, R, D] when the model has
  registers, `dist_token` [B, D] for a distilled ViT without classes; all normalised, as forward_features gives them.
- XCiT backbones: `cls_token` and `patch_tokens`.
- ResNet backbones: `features` [B, C] (the pooled features `forward` returns) and `feature_map` [B, C, h, w].
- Classifiers (a ViT with classes, distill.models.classifiers.Classifier): `logits` [B, classes]; a distilled DeiT
  gives the mean of its two heads, as in evaluation mode (facebookresearch/deit).

Nothing half-written is left behind: the file is written in a hidden folder next to the output, checked there
(check=True runs it with onnxruntime at the given size and at a non-square one and compares every output to the
PyTorch model in evaluation mode), then moved into place; any failure removes the folder.
"""

import contextlib
import copy
import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError, InputError
from distill.models.classifiers import Classifier
from distill.models.resnet import ResNetBackbone
from distill.models.vit import VisionTransformer
from distill.models.xcit import XCiTBackbone

logger = logging.getLogger(__name__)

# Default check tolerances: the largest allowed |onnxruntime - PyTorch| over an output, as a fraction of
# max(1, largest |PyTorch value| of that output). fp32 graphs differ from PyTorch by float32 rounding only (about
# 1e-6 on the normalised tokens of a ViT); an fp16 graph is compared with the float32 model, hence the looser one.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
# The example batch of the trace and of the check at the export size; the check at the other size uses another
# batch size, so that a graph whose batch were frozen would fail it. (torch.export fixes a dimension of 1.)
EXAMPLE_BATCH, OTHER_BATCH = 2, 3
# How many pixels the check's other size moves each side by, in units of the size step (patch size, or 32 for a
# CNN): height down, width up, so that the other size is non-square and both shrinking and growing are checked.
OTHER_SIZE_STEPS = 2
CNN_STEP = 32
# Loggers of the exporter and its graph optimiser, which report each rewrite at INFO level: kept at WARNING
# during the export so that a command run with INFO logging prints the outcome, not hundreds of rewrites.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
# Names of the symbolic dimensions of the outputs besides the batch (the others keep the exporter's names).
OUTPUT_DIM_NAMES = {"patch_tokens": {1: "num_patches"}, "feature_map": {2: "map_height", 3: "map_width"}}


@dataclass
class OnnxReport:
    """What export_onnx wrote and how it was checked."""

    path: Path
    outputs: List[str]  # names of the graph outputs, in order
    max_deviation: float  # max |onnxruntime - PyTorch| over all outputs, on the check inputs (0.0 without check)
    checked_sizes: List[Tuple[int, int]]  # (H, W) sizes compared
    fp16: bool


def _require_onnx():
    """onnxruntime, after making sure the exporter's packages are there; one clear error otherwise."""
    # onnxscript: torch.onnx's dynamo exporter writes the graph with it; onnx: the exporter and onnxruntime need it.
    modules = {}
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            modules[package] = importlib.import_module(package)
        except ImportError:
            raise InputError(f"ONNX export needs onnx, onnxruntime and onnxscript ({package} is missing): "
                             "pip install 'distill[export]'") from None
    return modules["onnxruntime"]


# ---------------------------------------------------------------------------------------------- the graph's view


class _GraphView(nn.Module):
    """The model as the graph exposes it: images in, a tuple of tensors out, in the order of `names`."""

    def __init__(self, model: nn.Module, kind: str, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.kind, self.names = model, kind, list(names)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.kind == "tokens":
            tokens = self.model.forward_features(images)
            keys = {"cls_token": "x_norm_clstoken", "patch_tokens": "x_norm_patchtokens",
                    "register_tokens": "x_norm_regtokens", "dist_token": "x_norm_disttoken"}
            return tuple(tokens[keys[name]] for name in self.names)
        if self.kind == "resnet":
            feature_map = self.model.forward_feature_map(images)
            # the pooling of ResNetBackbone.forward
            return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1), feature_map
        return (self.model(images),)


def _graph_kind(model: nn.Module) -> Tuple[str, List[str]]:
    """How to read the model ("tokens", "resnet" or "logits") and the names of the graph's outputs."""
    if isinstance(model, VisionTransformer):
        if model.num_classes:
            return "logits", ["logits"]
        names = ["cls_token", "patch_tokens"]
        if model.num_register_tokens:
            names.append("register_tokens")
        if model.dist_token is not None:
            names.append("dist_token")
        return "tokens", names
    if isinstance(model, XCiTBackbone):
        return "tokens", ["cls_token", "patch_tokens"]
    if isinstance(model, ResNetBackbone):
        return "resnet", ["features", "feature_map"]
    if isinstance(model, Classifier):
        return "logits", ["logits"]
    raise InputError(f"export_onnx takes distill's backbones (create_backbone) and classifiers (create_classifier), "
                     f"got a {type(model).__name__}: wrap the network in distill.models.classifiers.Classifier")


def _size_step(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The (height, width) multiple the model's input must be (its patch size), or None for any size (CNNs)."""
    if isinstance(model, (VisionTransformer, XCiTBackbone)):
        return model.patch_size, model.patch_size
    if isinstance(model, Classifier):
        patch = getattr(getattr(model.net, "patch_embed", None), "patch_size", None)
        if isinstance(patch, int):
            return patch, patch
        if isinstance(patch, (tuple, list)) and len(patch) == 2:
            return int(patch[0]), int(patch[1])
    return None


def _other_size(size: Tuple[int, int], step: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """A non-square size near `size` on the model's grid: height a few steps down (up if too small), width up."""
    step_h, step_w = step or (CNN_STEP, CNN_STEP)
    height = size[0] - OTHER_SIZE_STEPS * step_h
    if height < 2 * step_h:
        height = size[0] + 2 * OTHER_SIZE_STEPS * step_h
    return height, size[1] + OTHER_SIZE_STEPS * step_w


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself when its floating-point tensors are all `dtype`, else a converted copy (the caller's model
    is never changed)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in tensors):
        return model
    return copy.deepcopy(model).to(dtype)


# ---------------------------------------------------------------------------------------------- export


def _dynamic_shapes(step: Optional[Tuple[int, int]], dynamic_size: bool) -> Dict[str, Dict[int, object]]:
    """torch.export dimensions of `images`. A derived dimension (patch * Dim) tells the exporter that height and
    width are multiples of the patch size, which the patch embedding checks; without it the check's modulo would
    be a guard that fails the export."""
    from torch.export import Dim

    shapes: Dict[int, object] = {0: Dim("batch", min=1)}
    if dynamic_size:
        if step is None:
            shapes[2], shapes[3] = Dim("height", min=2), Dim("width", min=2)
        else:
            shapes[2], shapes[3] = step[0] * Dim("patch_rows", min=1), step[1] * Dim("patch_columns", min=1)
    return {"images": shapes}


def _name_dimensions(program, names: Sequence[str], in_chans: int, size: Optional[Tuple[int, int]]) -> None:
    """Readable symbolic dimensions on the graph's input and outputs: batch, height, width, num_patches."""
    import onnx_ir as ir

    graph = program.model.graph
    graph.inputs[0].shape = ir.Shape(["batch", in_chans] + (["height", "width"] if size is None else list(size)))
    for name, value in zip(names, graph.outputs):
        if value.shape is None:
            continue
        dims = []
        for index, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif index == 0:
                dims.append("batch")
            else:
                dims.append(OUTPUT_DIM_NAMES.get(name, {}).get(index, f"{name}_{index}"))
        value.shape = ir.Shape(dims)


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    """Loggers `names` at WARNING or above for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _export(view: nn.Module, example: torch.Tensor, names: Sequence[str], path: Path, *, opset: int,
            step: Optional[Tuple[int, int]], dynamic_size: bool, metadata: Dict[str, str]) -> None:
    """Write the graph of `view` to `path` (weights in a `.data` file beside it only past protobuf's 2 GB limit).

    The exporter is torch.onnx's dynamo path (torch.export): it keeps the image size symbolic through the whole
    forward pass, so the position-embedding resize of a ViT and the Fourier encoding of an XCiT follow the input
    size in the graph. The TorchScript exporter records Python integers (the patch grid) as constants, which would
    freeze the resize at the traced size.
    """
    try:
        with _quiet(EXPORTER_LOGGERS):
            program = torch.onnx.export(view, (example,), dynamo=True, input_names=["images"],
                                        output_names=list(names), dynamic_shapes=_dynamic_shapes(step, dynamic_size),
                                        opset_version=opset, verbose=False)
    except Exception as error:  # the exporter raises many kinds; the cause is the model's code, named below
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise DistillError(f"torch.onnx could not export {metadata['distill.model']} ({type(error).__name__}: "
                           f"{first}): its forward pass does not trace with torch.export") from error
    _name_dimensions(program, names, example.shape[1], None if dynamic_size else tuple(example.shape[-2:]))
    program.model.metadata_props.update(metadata)
    with _quiet(EXPORTER_LOGGERS):
        program.save(str(path))


# ---------------------------------------------------------------------------------------------- check


def _run_onnxruntime(onnxruntime, path: Path, images: np.ndarray) -> List[np.ndarray]:
    """The graph's outputs for `images`, on onnxruntime's CPU provider."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def _compare(names: Sequence[str], got: Sequence[np.ndarray], expected: Sequence[torch.Tensor],
             size: Tuple[int, int], tolerance: float) -> float:
    """Max |got - expected| over the outputs; DistillError naming the first output beyond the tolerance."""
    largest = 0.0
    for name, ours, reference in zip(names, got, expected):
        reference = reference.detach().float().numpy()
        if ours.shape != reference.shape:
            raise DistillError(f"the ONNX graph's {name} at {size[0]}x{size[1]} has shape {tuple(ours.shape)} "
                               f"instead of PyTorch's {tuple(reference.shape)}: the export is wrong, nothing written")
        if not reference.size:
            continue
        deviation = float(np.abs(ours.astype(np.float32) - reference).max())
        scale = max(1.0, float(np.abs(reference).max()))
        if not deviation <= tolerance * scale:  # NaN fails too
            raise DistillError(f"the ONNX graph's {name} at {size[0]}x{size[1]} differs from PyTorch by "
                               f"{deviation:.3g} (allowed {tolerance:g} x max(1, |{name}| = {scale:.3g})): "
                               "nothing written; the export of this model is wrong, please report it")
        largest = max(largest, deviation)
    return largest


# ---------------------------------------------------------------------------------------------- entry point


def _model_name(model: nn.Module) -> str:
    return getattr(model, "registry_name", None) or getattr(model, "config", {}).get("name") or type(model).__name__


def export_onnx(model: nn.Module, output: Union[str, Path], *, image_size: Tuple[int, int], in_chans: int = 3,
                fp16: bool = False, opset: int = 18, check: bool = True,
                tolerance: Optional[float] = None) -> OnnxReport:
    """Write `model` as an ONNX graph to `output` and, with check=True, prove it computes what PyTorch does.

    model: a backbone from create_backbone (ViT, XCiT, ResNet) or a classifier (a ViT with classes, a
        create_classifier network); it is exported in evaluation mode and left in the mode it came in.
    image_size: (height, width) of the trace and of the first check; the graph takes any batch and any size on
        the model's grid (multiples of the patch size), unless the network itself only runs at one size (a timm
        ViT built without dynamic_img_size): the graph is then fixed to image_size, with a warning.
    fp16: the graph in float16 (weights, input and outputs), compared with the float32 model.
    check: run the file with onnxruntime on random images at image_size (batch 2) and at a non-square size a few
        patches off (batch 3) and compare every output with PyTorch: the largest |difference| must be within
        tolerance x max(1, largest |value| of that output). Default tolerance 1e-4, or 1e-2 with fp16.
    """
    onnxruntime = _require_onnx()
    output = Path(output)
    size = (int(image_size[0]), int(image_size[1]))
    kind, names = _graph_kind(model)
    step = _size_step(model)
    if step is not None and (size[0] % step[0] or size[1] % step[1] or size[0] < step[0] or size[1] < step[1]):
        fit = (max(step[0], round(size[0] / step[0]) * step[0]), max(step[1], round(size[1] / step[1]) * step[1]))
        raise InputError(f"image_size {size[0]}x{size[1]} is not a multiple of the patch size {step[0]}x{step[1]}: "
                         f"choose e.g. {fit[0]}x{fit[1]}")
    if output.is_dir():
        raise InputError(f"{output} is a folder: give a file name such as {output / 'model.onnx'}")
    if tolerance is None:
        tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    name = _model_name(model)

    was_training = model.training
    model.eval()
    partial: Optional[Path] = None
    try:
        # Check inputs and PyTorch's answers (float32), computed first: a network that cannot run at another size
        # than image_size (timm's ViTs without dynamic_img_size assert on it) gets a graph of fixed size.
        generator = torch.Generator().manual_seed(0)
        sizes = [size, _other_size(size, step)]
        images = [torch.randn(batch, in_chans, *s, generator=generator)
                  for batch, s in zip((EXAMPLE_BATCH, OTHER_BATCH), sizes)]
        reference = _GraphView(_in_dtype(model, torch.float32), kind, names).eval()
        with torch.no_grad():
            expected = [reference(images[0])]
            try:
                expected.append(reference(images[1]))
            except Exception as error:  # whatever the network raises at a size it does not take
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                logger.warning("%s does not run at %dx%d (%s): the ONNX graph takes %dx%d images only", name,
                               *sizes[1], first, *size)
                sizes = sizes[:1]
        dynamic_size = len(sizes) == 2

        dtype = torch.float16 if fp16 else torch.float32
        view = _GraphView(_in_dtype(model, dtype), kind, names).eval()
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        written = partial / output.name
        metadata = {"distill.model": name, "distill.outputs": ",".join(names),
                    "distill.image_size": f"{size[0]}x{size[1]}", "distill.fp16": str(bool(fp16)).lower()}
        _export(view, images[0].to(dtype), names, written, opset=opset, step=step, dynamic_size=dynamic_size,
                metadata=metadata)

        max_deviation = 0.0
        if check:
            for s, batch, answers in zip(sizes, images, expected):
                got = _run_onnxruntime(onnxruntime, written, batch.to(dtype).numpy())
                max_deviation = max(max_deviation, _compare(names, got, answers, s, tolerance))
            logger.info("ONNX graph of %s matches PyTorch at %s to %.2g (tolerance %g)", name,
                        ", ".join(f"{h}x{w}" for h, w in sizes), max_deviation, tolerance)
        _move_into_place(partial, output)
        partial = None
    finally:
        model.train(was_training)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return OnnxReport(path=output, outputs=list(names), max_deviation=max_deviation,
                      checked_sizes=sizes if check else [], fp16=bool(fp16))


def _move_into_place(folder: Path, output: Path) -> None:
    """Move the written files (the graph, and its weights file if any) next to `output`, the graph last, then
    remove the emptied folder."""
    graph = folder / output.name
    for path in sorted(folder.iterdir()):
        if path != graph:
            os.replace(path, output.parent / path.name)
    os.replace(graph, output)
    folder.rmdir()

