"""Linear semantic segmentation on frozen patch features, as DINOv2 evaluates its backbones (Oquab et al. 2023,
"DINOv2: Learning Robust Visual Features without Supervision", section 7.4 "linear" and "+ms" without the test-time
multi-scale; official head: dinov2/eval/segmentation/models/decode_heads/linear_head.py, BNHead): the patch tokens
of the last layer (or of the last four, concatenated), a BatchNorm, a 1x1 linear layer to class logits, upsampled
bilinearly to the mask, trained with AdamW on a per-pixel cross-entropy that skips IGNORE_INDEX.

The features are computed once (the backbone is frozen) and the head is trained on them in mini-batches; a
raw-pixel baseline (each patch's pixels, flattened) goes through the same probe. Masks are PNG files of class
indices, 255 = ignore. Metrics: mean IoU over the classes present in the prediction or the ground truth, per-class
IoU, pixel accuracy, all in percent.
"""

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.data.filelists import readable_name
from distill.dense.features import DenseFeatures, extract
from distill.dense.images import display
from distill.dense.kinds import IGNORE_INDEX, LAYER_SETS
from distill.errors import InputError
from distill.files import atomic_write
from distill.progress import progress

HEAD_FORMAT = "distill.segmentation_head.v1"
Masks = Union[torch.Tensor, Sequence[torch.Tensor]]  # [N, H, W], or N masks [H_i, W_i] of their own sizes


def resolve_layers(layers: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """"last" -> (-1,), "last4" -> (-4, -3, -2, -1), or block indices as given."""
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise InputError(f"layers {layers!r} unknown: choose {' or '.join(LAYER_SETS)}, or block indices")
        return LAYER_SETS[layers]
    return tuple(int(layer) for layer in layers)


def segmentation_features(model: nn.Module, images: torch.Tensor, layers: Union[str, Sequence[int]] = "last",
                          chunk: int = 16, precision: str = "fp32") -> DenseFeatures:
    """Frozen patch features of normalised images [B, C, H, W] for the probe: the final-LayerNorm'd tokens of the
    last block ("last") or of the last four concatenated ("last4", DINOv2's multi-layer variant), patches
    [B, h, w, C * layers], float32 on the CPU, computed in chunks of `chunk` images."""
    return extract(model, images, layers=resolve_layers(layers), chunk=chunk, precision=precision)


def pixel_patches(images: torch.Tensor, patch_size: int, stride: Optional[int] = None, chunk: int = 64
                  ) -> DenseFeatures:
    """The raw-pixel baseline's "features": each patch's pixels flattened, [B, C, H, W] -> patches
    [B, h, w, C * p * p] on the grid a ViT of that patch size has."""
    step = stride or patch_size
    height, width = images.shape[-2:]
    if height < patch_size or width < patch_size:
        raise InputError(f"images of {height}x{width} are smaller than a {patch_size} px patch")
    grid = ((height - patch_size) // step + 1, (width - patch_size) // step + 1)
    parts = []
    for start in range(0, len(images), chunk):
        windows = F.unfold(images[start:start + chunk].float(), kernel_size=patch_size, stride=step)
        parts.append(windows.transpose(1, 2).reshape(-1, grid[0], grid[1], windows.shape[1]))
    return DenseFeatures(torch.cat(parts), None, patch_size, step, (height, width))


class LinearSegmentationHead(nn.Module):
    """BatchNorm (optional) and a 1x1 linear layer: features [B, h, w, C] -> logits [B, classes, h, w]."""

    def __init__(self, in_features: int, classes: int, batch_norm: bool = True):
        super().__init__()
        self.in_features, self.classes = in_features, classes
        self.bn = nn.BatchNorm2d(in_features) if batch_norm else nn.Identity()
        self.linear = nn.Conv2d(in_features, classes, kernel_size=1)
        nn.init.normal_(self.linear.weight, std=0.01)  # mmseg's init of a decode head's last layer
        nn.init.zeros_(self.linear.bias)

    @property
    def batch_norm(self) -> bool:
        return isinstance(self.bn, nn.BatchNorm2d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(features.permute(0, 3, 1, 2)))


def _mask_list(masks: Masks, index: Sequence[int]) -> List[torch.Tensor]:
    return [masks[int(i)] for i in index]


def _by_size(logits: torch.Tensor, targets: List[torch.Tensor]):
    """Yield (logits upsampled bilinearly to the targets' size [b, K, H, W], targets int64 [b, H, W]) for each group
    of same-sized targets in a batch (masks keep their image's original size)."""
    groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
    for position, target in enumerate(targets):
        groups[tuple(target.shape[-2:])].append(position)
    for size, positions in groups.items():
        upsampled = F.interpolate(logits[positions], size=size, mode="bilinear", align_corners=False)
        yield upsampled, torch.stack([targets[p] for p in positions]).to(logits.device, torch.int64)


def _learning_rate(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up then polynomial (power 1) decay to 0, the schedule of DINOv2's linear segmentation configs;
    a factor of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - (step - warmup) / max(1, steps - warmup))


def train_head(features: torch.Tensor, masks: Masks, classes: int, epochs: int = 20, lr: float = 1e-3,
               weight_decay: float = 1e-4, batch_size: int = 8, batch_norm: bool = True, seed: int = 0,
               device: Union[str, torch.device] = "cpu", desc: str = "segmentation head") -> LinearSegmentationHead:
    """A LinearSegmentationHead fitted to features [N, h, w, C] (CPU) and masks (uint8 class indices, IGNORE_INDEX
    skipped) by AdamW on the per-pixel cross-entropy of the upsampled logits. Memory: one mini-batch of features
    on the device, and its logits at mask size (batch_size * classes * H * W floats)."""
    if len(features) != len(masks):
        raise InputError(f"{len(features)} feature maps for {len(masks)} masks: give one mask per image")
    if epochs < 1 or batch_size < 1:
        raise InputError(f"epochs and batch size must be positive, got {epochs} and {batch_size}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's initial weights
    head = LinearSegmentationHead(features.shape[-1], classes, batch_norm).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = -(-len(features) // batch_size)
    steps = epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _learning_rate(s, steps, max(1, steps // 20)))
    head.train()
    bar = progress(total=steps, desc=desc, leave=False)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                logits = head(features[index].to(device))
                loss, pixels = logits.new_zeros(()), 0
                for upsampled, target in _by_size(logits, _mask_list(masks, index)):
                    loss = loss + F.cross_entropy(upsampled, target, ignore_index=IGNORE_INDEX, reduction="sum")
                    pixels += int((target != IGNORE_INDEX).sum())
                if pixels:
                    optimizer.zero_grad(set_to_none=True)
                    (loss / pixels).backward()
                    optimizer.step()
                scheduler.step()
                bar.update()
    finally:
        bar.close()
    return head.eval()


@torch.no_grad()
def predict(head: LinearSegmentationHead, features: torch.Tensor, sizes: Sequence[Tuple[int, int]],
            chunk: int = 16) -> List[torch.Tensor]:
    """Class index maps uint8 [H_i, W_i] of features [N, h, w, C], logits upsampled to each size (H_i, W_i)."""
    head.eval()
    device = next(head.parameters()).device
    outputs: List[torch.Tensor] = []
    for start in range(0, len(features), chunk):
        logits = head(features[start:start + chunk].to(device)).float()
        for offset, size in enumerate(sizes[start:start + chunk]):
            upsampled = F.interpolate(logits[offset:offset + 1], size=tuple(size), mode="bilinear",
                                      align_corners=False)
            outputs.append(upsampled[0].argmax(0).to(torch.uint8).cpu())
    return outputs


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [classes, classes], rows the ground truth, columns the prediction, over pixels whose target is not
    ignore_index. predictions and targets: integer tensors of one shape."""
    targets, predictions = targets.reshape(-1).long(), predictions.reshape(-1).long()
    kept = targets != ignore_index
    targets, predictions = targets[kept], predictions[kept]
    if len(targets) and (int(targets.max()) >= classes or int(predictions.max()) >= classes):
        raise InputError(f"class index beyond the {classes} classes in the masks or predictions")
    return torch.bincount(targets * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str]) -> Dict[str, object]:
    """{"miou", "per_class_iou", "pixel_accuracy"} in percent from a confusion matrix [K, K]. IoU of a class:
    true positives / (true + false positives + false negatives); a class absent from both the prediction and the
    ground truth has no IoU (None) and is left out of the mean."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    per_class = {name: (100.0 * float(hits[k] / union[k]) if union[k] > 0 else None)
                 for k, name in enumerate(class_names)}
    present = [value for value in per_class.values() if value is not None]
    total = float(confusion.sum())
    return {
        "miou": sum(present) / len(present) if present else 0.0,
        "per_class_iou": per_class,
        "pixel_accuracy": 100.0 * float(hits.sum()) / total if total else 0.0,
    }


def evaluate_segmentation(head: LinearSegmentationHead, features: torch.Tensor, masks: Masks,
                          class_names: Sequence[str], chunk: int = 16) -> Dict[str, object]:
    """Metrics (segmentation_metrics) of the head on features [N, h, w, C] against masks, the confusion matrix
    accumulated chunk by chunk (memory: one chunk's logits at mask size)."""
    if len(features) != len(masks):
        raise InputError(f"{len(features)} feature maps for {len(masks)} masks: give one mask per image")
    if head.classes != len(class_names):
        raise InputError(f"the head predicts {head.classes} classes but {len(class_names)} class names were given")
    confusion = torch.zeros(head.classes, head.classes, dtype=torch.int64)
    for start in range(0, len(features), chunk):
        targets = _mask_list(masks, range(start, min(start + chunk, len(features))))
        predicted = predict(head, features[start:start + chunk], [t.shape[-2:] for t in targets], chunk)
        for prediction, target in zip(predicted, targets):
            confusion += confusion_matrix(prediction, target, head.classes)
    return segmentation_metrics(confusion, class_names)


def save_head(path: Union[str, Path], head: LinearSegmentationHead, class_names: Sequence[str],
              layers: Union[str, Sequence[int]]) -> Path:
    """The head's weights with its class names and the layers its features came from ("pixels" for the raw-pixel
    baseline), written atomically; plain tensors, strings and numbers, so that it loads with weights_only=True."""
    payload = {
        "format": HEAD_FORMAT,
        "state_dict": {key: value.detach().cpu() for key, value in head.state_dict().items()},
        "classes": [str(name) for name in class_names],
        "layers": layers if isinstance(layers, str) else [int(layer) for layer in layers],
        "in_features": head.in_features,
        "batch_norm": head.batch_norm,
    }
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_head(path: Union[str, Path]) -> Tuple[LinearSegmentationHead, List[str], Union[str, List[int]]]:
    """(head in eval mode, class names, layers) from a save_head file."""
    name = readable_name(str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"segmentation head {name} not found: give the file `save_head` wrote") from None
    except Exception as error:
        raise InputError(f"cannot read segmentation head {name} ({str(error).splitlines()[0][:120]}): give a file "
                         "that `save_head` wrote") from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise InputError(f"{name} is not a segmentation head written by save_head: give the head file of "
                         "`distill eval segment`")
    head = LinearSegmentationHead(payload["in_features"], len(payload["classes"]), payload["batch_norm"])
    head.load_state_dict(payload["state_dict"])
    return head.eval(), list(payload["classes"]), payload["layers"]


def read_mask(path: Union[str, Path]) -> torch.Tensor:
    """A mask file (PNG of class indices: 8-bit grey, palette, 16-bit or 1-bit) -> int64 [H, W]."""
    from PIL import Image

    name = readable_name(str(path))
    try:
        with Image.open(path) as handle:
            handle.load()
            mode, array = handle.mode, np.array(handle)
    except FileNotFoundError:
        raise InputError(f"mask {name} not found: give one mask per image") from None
    except Exception as error:
        raise InputError(f"cannot read mask {name} ({str(error).splitlines()[0][:120]}): save it as a PNG of class "
                         "indices") from None
    if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise InputError(f"mask {name} is a {mode} image: a mask is a single-channel PNG of class indices (grey or "
                         "palette), 255 = ignore; save the indices, not colours")
    return torch.from_numpy(array.astype(np.int64))


def check_mask(mask: torch.Tensor, classes: int, mask_path: str, image_size: Optional[Tuple[int, int]] = None,
               image_path: Optional[str] = None) -> torch.Tensor:
    """The mask as uint8 [H, W], after checking its size against its image's (height, width) and its indices
    against the classes (0 to classes - 1, and IGNORE_INDEX); a mismatch is a one-line InputError naming the file."""
    name = readable_name(str(mask_path))
    if image_size is not None and tuple(mask.shape) != tuple(image_size):
        height, width = mask.shape
        raise InputError(f"mask {name} is {width}x{height} but its image {readable_name(str(image_path))} is "
                         f"{image_size[1]}x{image_size[0]}: a mask must have its image's size (resize it with "
                         "nearest neighbour)")
    bad = mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= classes))]
    if len(bad):
        raise InputError(f"mask {name} holds class index {int(bad.max())} but there are {classes} classes (0-"
                         f"{classes - 1}, {IGNORE_INDEX} = ignore): fix the mask, or name every class (classes.txt)")
    return mask.to(torch.uint8)


def load_masks(paths: Sequence[str], classes: int, image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
               image_paths: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
    """Masks uint8 [H_i, W_i] of files, each checked (check_mask) against its image's original (height, width)."""
    masks = []
    for position, path in enumerate(paths):
        size = image_sizes[position] if image_sizes is not None else None
        image = image_paths[position] if image_paths is not None else None
        masks.append(check_mask(read_mask(path), classes, path, size, image))
    return masks


# The PASCAL VOC colour map (Everingham et al.): 0 black, then colours from the bits of the index; 255, VOC's
# "void", is its cream (224, 224, 192), here the colour of ignored pixels.
def _voc_palette() -> np.ndarray:
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    return palette


PALETTE = _voc_palette()


def colour_mask(mask: torch.Tensor) -> np.ndarray:
    """Class indices [H, W] -> RGB [H, W, 3] in [0, 1] by PALETTE."""
    return PALETTE[mask.cpu().numpy().astype(np.int64) % 256] / 255.0


def save_segmentation_picture(path: Union[str, Path], images: torch.Tensor, masks: Sequence[torch.Tensor],
                              predictions: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float],
                              class_names: Sequence[str], titles: Optional[Sequence[str]] = None) -> Path:
    """A PNG, one row per image: the image (normalised [C, H, W], shown un-normalised) | ground truth | prediction,
    classes coloured by PALETTE with a legend of those shown; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    count = min(len(images), len(masks), len(predictions))
    if count == 0:
        raise InputError("no images to draw")
    fig, axes = plt.subplots(count, 3, figsize=(6.0, 2.0 * count + 0.6), squeeze=False)
    shown = set()
    for row in range(count):
        panels = [("image", display(images[row], mean, std).numpy()), ("ground truth", colour_mask(masks[row])),
                  ("prediction", colour_mask(predictions[row]))]
        shown |= set(masks[row].unique().tolist()) | set(predictions[row].unique().tolist())
        for column, (title, picture) in enumerate(panels):
            ax = axes[row, column]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        if titles:
            axes[row, 0].set_ylabel(titles[row], fontsize=7)
    names = {k: class_names[k] if k < len(class_names) else str(k) for k in shown}
    names.pop(IGNORE_INDEX, None)
    if IGNORE_INDEX in shown:
        names[IGNORE_INDEX] = "ignore"
    handles = [Patch(color=PALETTE[k] / 255.0, label=label) for k, label in sorted(names.items())]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, max(1, len(handles))), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if count < 3 else 0.06, 1, 1))
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)
    return Path(path)


__all__ = ["IGNORE_INDEX", "LAYER_SETS", "LinearSegmentationHead", "PALETTE", "check_mask", "colour_mask",
           "confusion_matrix", "evaluate_segmentation", "load_head", "load_masks", "pixel_patches", "predict",
           "read_mask", "resolve_layers", "save_head", "save_segmentation_picture", "segmentation_features",
           "segmentation_metrics", "train_head"]
