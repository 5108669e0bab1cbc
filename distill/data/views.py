"""DINO's multi-crop views: global crops for teacher and student, local crops for the student only.

Every random choice of a view (crop box, flip, colour jitter, grey, blur, solarize) is drawn from a generator
the loader seeds per sample (file images) or per batch (in-memory images), so the same data order gives the
same views after a resume, whatever the number of workers. The geometry of file images runs image by image
in the loader workers (bicubic, antialiased, on uint8); everything photometric runs batched: one colour matrix
per crop for jitter, greyscale and normalisation (`color: fused`), or torchvision's operations one by one
(`color: exact`).

A file's crop boxes are drawn on its full size before it is decoded (`draw`), so that a JPEG can be decoded at
the size they need (`reduction`, images.load_image_at_crop_size) and cut at the boxes' places in the reduced
image (`file_sample`): the same boxes, from the same draws, as a full decode would give.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

from distill.data import augment
from distill.data.configs import MultiCropConfig
from distill.data.images import Frame


def uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded RGB or grey PIL image as a uint8 tensor [C, H, W] (one writable copy of its pixels)."""
    array = np.array(image)
    return torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]


def _batch_tensor(shape: Sequence[int]) -> torch.Tensor:
    """An empty float tensor for crops that leave a loader worker: allocated in shared memory there, as the
    default collate does, so that sending the batch to the training process is not one more copy of it."""
    if get_worker_info() is None:
        return torch.empty(shape)
    numel = math.prod(shape)
    return torch.empty(0).new(torch.empty(0)._typed_storage()._new_shared(numel)).view(*shape)


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """torchvision's resized_crop of a uint8 image [C, H, W] to size x size (bicubic, antialiased: the same uint8
    kernel, the same pixels) without its dispatch, which costs a tenth of a small crop's time."""
    box = image[None, :, top : top + height, left : left + width]
    if (height, width) == (size, size):
        return box[0].contiguous()
    return F.interpolate(box, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]


@dataclass(frozen=True)
class CropSpec:
    size: int
    scale: Sequence[float]
    blur_prob: float
    solarize_prob: float


class MultiCrop:
    """Makes the crops of a batch: a list of float tensors [B, channels, S, S], global crops first."""

    def __init__(self, config: MultiCropConfig, channels: int) -> None:
        config.validate()
        self.config = config
        self.channels = channels
        pick = lambda values, i: values[min(i, len(values) - 1)]  # noqa: E731
        self.specs = [
            CropSpec(config.global_crops_size, config.global_crops_scale, pick(config.global_blur_probs, i),
                     pick(config.global_solarize_probs, i))
            for i in range(config.global_crops_number)
        ] + [
            CropSpec(config.local_crops_size, config.local_crops_scale, config.local_blur_prob,
                     config.local_solarize_prob)
        ] * config.local_crops_number
        # Consecutive crops with the same spec (the local crops) are augmented together, as one batch.
        self.groups: List[List[int]] = []
        for index, spec in enumerate(self.specs):
            if self.groups and self.specs[self.groups[-1][0]] == spec:
                self.groups[-1].append(index)
            else:
                self.groups.append([index])
        self.mean, self.std = config.channel_stats(channels)

    @property
    def num_global(self) -> int:
        return self.config.global_crops_number

    @property
    def min_image_size(self) -> int:
        """Decoded images are upscaled to at least this short side, so no crop is cut from a few pixels."""
        return self.config.global_crops_size

    def _params(self, spec: CropSpec, n: int, height: int, width: int, generator) -> Dict[str, torch.Tensor]:
        c = self.config
        params = augment.sample_color_params(
            n, c.color_jitter_prob, c.brightness, c.contrast, c.saturation, c.hue, c.grayscale_prob,
            spec.blur_prob, c.blur_sigma, spec.solarize_prob, generator,
        )
        params["boxes"] = augment.sample_crop_boxes(n, height, width, spec.scale, c.ratio, generator)
        params["flip"] = torch.rand(n, generator=generator) < c.flip_prob
        return params

    def _finish(self, crops: torch.Tensor, params: Dict[str, torch.Tensor], count: int) -> List[torch.Tensor]:
        """Crops [count * B, C, S, S] (uint8, or float in [0, 1]) -> photometric augmentation -> `count`
        normalised float batches."""
        if self.config.color == "fused":
            shape = (crops.shape[0], self.channels, *crops.shape[2:])
            crops = augment.photometric_fused(crops, params, self.mean, self.std, self.channels, _batch_tensor(shape))
        else:
            floats = crops.float().div_(255.0) if crops.dtype == torch.uint8 else crops
            crops = augment.normalize(augment.photometric(floats, params), self.mean, self.std, self.channels)
        return list(crops.chunk(count))

    # ---------------------------------------------------------------- whole batches of in-memory images

    def array_batch(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> List[torch.Tensor]:
        """uint8 images [B, C, H, W] -> crops; each group of same-spec crops takes one grid_sample."""
        floats = images.float().div_(255.0)
        outputs: List[torch.Tensor] = []
        for group in self.groups:
            spec, count = self.specs[group[0]], len(group)
            params = self._params(spec, count * len(images), images.shape[-2], images.shape[-1], generator)
            repeated = floats.repeat(count, 1, 1, 1) if count > 1 else floats
            crops = augment.resized_crops(repeated, params["boxes"], params["flip"], spec.size)
            outputs.extend(self._finish(crops, params, count))
        return outputs

    # ---------------------------------------------------------------- image by image (files), then collate

    def draw(self, height: int, width: int, generator: Optional[torch.Generator]) -> List[Dict[str, torch.Tensor]]:
        """The random parameters of one image's crops, boxes on its full (height, width): one dict per group of
        same-spec crops, drawn in the order image_sample has always drawn them (cutting draws nothing)."""
        return [self._params(self.specs[group[0]], len(group), height, width, generator) for group in self.groups]

    def reduction(self, params: List[Dict[str, torch.Tensor]]) -> float:
        """How many times smaller the image may be decoded with every crop box still at least its crop's output
        size in both dimensions: no crop is then enlarged where the full image would not have enlarged it, and
        each is still a downsampling of its region."""
        return min(float(p["boxes"][:, 2:].min()) / self.specs[group[0]].size for group, p in zip(self.groups, params))

    def _cut(self, image: torch.Tensor, params: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
        crops = []
        for group, p in zip(self.groups, params):
            size = self.specs[group[0]].size
            for (top, left, h, w), flip in zip(p["boxes"].tolist(), p["flip"].tolist()):
                crop = resized_crop(image, top, left, h, w, size)
                crops.append(crop.flip(-1) if flip else crop)
        return {"crops": crops, "params": params}

    def image_sample(self, image: torch.Tensor, generator: Optional[torch.Generator]) -> Dict[str, Any]:
        """uint8 image [C, H, W] -> its uint8 crops (bicubic, antialiased) and their photometric parameters, drawn
        once per group of same-spec crops."""
        return self._cut(image, self.draw(image.shape[-2], image.shape[-1], generator))

    def file_sample(self, image: Image.Image, frame: Frame, params: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
        """image_sample for a file decoded by images.load_image_at_crop_size, with `params` drawn on the frame's
        size: a full decode is cut exactly as image_sample cuts it; a reduced one at each box's place in it, to
        the nearest reduced pixel edge. That is within half an output pixel of the exact place, since a reduction
        leaves every box at least its output size (Pillow's resize takes fractional boxes, but at three times
        torchvision's time on uint8 it would cost more than the reduced decode saves)."""
        if not frame.reduced:
            return self._cut(uint8_tensor(image), params)
        placed = [dict(p, boxes=torch.tensor([frame.box(*box) for box in p["boxes"].tolist()])) for p in params]
        sample = self._cut(uint8_tensor(image), placed)
        sample["params"] = params  # the boxes as drawn, on the full image
        return sample

    def collate(self, samples: List[Dict[str, Any]]) -> List[torch.Tensor]:
        """Per-image uint8 crops -> batches; photometric augmentation once per group of same-spec crops.

        A group's batch holds its first crop of every image, then its second, and so on (as `array_batch`)."""
        outputs: List[torch.Tensor] = []
        for number, group in enumerate(self.groups):
            crops = torch.stack([s["crops"][i] for i in group for s in samples])  # one copy of the group's crops
            params = {key: torch.stack([s["params"][number][key] for s in samples], dim=1).flatten(0, 1)
                      for key in samples[0]["params"][number]}
            outputs.extend(self._finish(crops, params, len(group)))
        return outputs
