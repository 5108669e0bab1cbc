"""Batched image augmentation on tensors: every random parameter is drawn per sample, every operation runs on
the whole batch at once. Definitions follow torchvision (RandomResizedCrop, ColorJitter, RandomGrayscale) and
PIL (solarize at 128), so a batch augmented here is distributed like one augmented image by image.

Images are float tensors [B, C, H, W] in [0, 1] with C = 1 (grey) or 3 (RGB).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import InputError

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision and PIL


# The draws below take their random numbers from torch generators (the loader seeds one per image) and do the
# rest of their arithmetic in numpy: a file image's views are drawn a few at a time, where each torch operation
# on a tensor of ten values costs more than the arithmetic itself.


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator]) -> np.ndarray:
    return torch.rand(n, generator=generator).numpy() * np.float32(high - low) + np.float32(low)


def _bernoulli(n: int, p: float, generator: Optional[torch.Generator]) -> np.ndarray:
    return torch.rand(n, generator=generator).numpy() < p


# ------------------------------------------------------------------------------------------------ geometry


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] as (top, left, height, width), torchvision's algorithm vectorised:
    up to 10 tries of (area fraction in scale, log-uniform aspect ratio), else the central crop."""
    area = height * width
    log_ratio = np.log(np.array(ratio, dtype=np.float64))
    draws = torch.rand(n, attempts, generator=generator, dtype=torch.float64).numpy()
    target = area * (draws * (scale[1] - scale[0]) + scale[0])
    draws = torch.rand(n, attempts, generator=generator, dtype=torch.float64).numpy()
    aspect = np.exp(draws * (log_ratio[1] - log_ratio[0]) + log_ratio[0])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    valid = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = valid.argmax(axis=1)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], valid.any(axis=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = np.where(found, w, fallback_w)
    h = np.where(found, h, fallback_h)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64).numpy()
    top = np.where(found, np.floor(u[:, 0] * (height - h + 1)), (height - h) // 2)
    left = np.where(found, np.floor(u[:, 1] * (width - w + 1)), (width - w) // 2)
    return torch.from_numpy(np.stack([top, left, h, w], axis=1).astype(np.int64))


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop boxes [B, 4] out of float images [B, C, H, W], resize each to size x size (bilinear) and mirror
    where flips [B] is True, all in one grid_sample."""
    return F.grid_sample(images, crop_grid(boxes, flips, size, images.shape[-2:], images.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def crop_grid(boxes: torch.Tensor, flips: torch.Tensor, size: int, image_size: Sequence[int],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """grid_sample's sampling grid [B, size, size, 2] for crop boxes [B, 4] (top, left, height, width) of images
    of image_size (height, width), mirrored where flips [B]: what F.affine_grid gives (align_corners=False) for
    the axis-aligned maps x -> (+-w x + 2 left + w) / width - 1, y -> (h y + 2 top + h) / height - 1, built as an
    outer sum of one row and one column per crop instead of affine_grid's batched product over every point (a
    millisecond for 512 crops of 14 px, a fifth of a batch's augmentation)."""
    height, width = image_size
    top, left, h, w = boxes.to(dtype).unbind(1)
    sign = 1.0 - 2.0 * flips.to(dtype)
    centres = (torch.arange(size, dtype=dtype) * 2 + 1) / size - 1  # output pixel centres in [-1, 1]
    x = (sign * w / width)[:, None] * centres + ((2 * left + w) / width - 1)[:, None]  # [B, size]
    y = (h / height)[:, None] * centres + ((2 * top + h) / height - 1)[:, None]
    grid = torch.empty(len(boxes), size, size, 2, dtype=dtype)
    grid[..., 0] = x[:, None, :]
    grid[..., 1] = y[:, :, None]
    return grid


# ------------------------------------------------------------------------------------------------ colour


def sample_color_params(
    n: int,
    jitter_prob: float,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
    solarize_prob: float,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """Per-sample photometric parameters; ColorJitter's order of the four operations is random per sample."""
    params = {
        "jitter": _bernoulli(n, jitter_prob, generator),
        "order": torch.rand(n, 4, generator=generator).argsort(dim=1),  # a uniform permutation per sample
        "brightness": _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator),
        "contrast": _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator),
        "saturation": _uniform(n, max(0.0, 1 - saturation), 1 + saturation, generator),
        "hue": _uniform(n, -hue, hue, generator),
        "grayscale": _bernoulli(n, grayscale_prob, generator),
        "blur": _bernoulli(n, blur_prob, generator),
        "sigma": _uniform(n, blur_sigma[0], blur_sigma[1], generator),
        "solarize": _bernoulli(n, solarize_prob, generator),
    }
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in params.items()}


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma; grey images pass through."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    inverse = 1.0 / torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) * inverse, (maxc - g) * inverse, (maxc - b) * inverse
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], dim=1)


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The branch-free form of the six-sector formula: channel n is v - v s clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6 and n = 5, 3, 1 for red, green, blue (one pass over the pixels instead of six)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    k = torch.remainder(_HSV_OFFSETS.to(hsv.dtype) + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _jitter_op(images: torch.Tensor, op: int, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """One ColorJitter operation with a per-sample factor; returns a new tensor."""
    if op == 0:  # brightness: blend with black
        return (images * _per_sample(params["brightness"])).clamp_(0, 1)
    if op == 1:  # contrast: blend with the image's mean grey level
        mean = to_grey(images).mean(dim=(1, 2, 3), keepdim=True)
        factor = _per_sample(params["contrast"])
        return (factor * images + (1 - factor) * mean).clamp_(0, 1)
    if images.shape[1] == 1:  # saturation and hue leave grey images unchanged
        return images
    if op == 2:  # saturation: blend with the grey version of each pixel
        factor = _per_sample(params["saturation"])
        return (factor * images + (1 - factor) * to_grey(images)).clamp_(0, 1)
    hsv = _rgb_to_hsv(images)  # hue: rotate
    hsv[:, 0] = (hsv[:, 0] + params["hue"].view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


def color_jitter(images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """ColorJitter applied to the samples whose `jitter` flag is set, each in its own random order.

    At each of the four positions, each operation runs on the samples whose order puts it there. Grey images
    skip saturation and hue, which cannot change them.
    """
    selected = params["jitter"]
    if not selected.any():
        return images
    operations = (0, 1) if images.shape[1] == 1 else (0, 1, 2, 3)
    images = images.clone()
    for position in range(4):
        chosen = params["order"][:, position]
        for op in operations:
            index = (selected & (chosen == op)).nonzero().flatten()
            if len(index):
                factors = {k: params[k][index] for k in ("brightness", "contrast", "saturation", "hue")}
                images[index] = _jitter_op(images[index], op, factors)
    return images


def random_grayscale(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1 or not flags.any():
        return images
    return torch.where(_per_sample(flags), to_grey(images).expand_as(images), images)


def gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [B, 2 * radius + 1]."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigmas[:, None].float() ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


def _chunks(n: int, values_per_sample: int, budget: int = 1 << 19):
    """Slices of about `budget` values over n samples: pieces that stay in cache between passes."""
    step = max(1, budget // values_per_sample)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def gaussian_blur(images: torch.Tensor, flags: torch.Tensor, sigmas: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (pixels), on the samples whose flag is set.

    The flagged samples go in order of sigma, a few at a time (about half a million values per grouped
    convolution, channels last): each piece stays in cache and takes the radius its largest sigma needs. One
    convolution over a whole batch of 224 px crops at the largest radius is several times slower."""
    selected = flags.nonzero().flatten()
    if not len(selected):
        return images
    if not inplace:
        images = images.clone()
    selected = selected[sigmas[selected].argsort()]
    _, channels, height, width = images.shape
    for piece in _chunks(len(selected), channels * height * width):
        index = selected[piece]
        radius = max(1, min(int(math.ceil(3 * float(sigmas[index].max()))), min(height, width) // 2 - 1 or 1))
        mode = "reflect" if radius < min(height, width) else "replicate"
        kernels = gaussian_kernels(sigmas[index], radius).to(images.dtype).repeat_interleave(channels, dim=0)
        groups = len(index) * channels
        flat = F.pad(images[index].reshape(1, groups, height, width), (radius,) * 4, mode=mode)
        flat = flat.contiguous(memory_format=torch.channels_last)
        flat = F.conv2d(flat, kernels[:, None, None, :], groups=groups)
        flat = F.conv2d(flat, kernels[:, None, :, None], groups=groups)
        images[index] = flat.view(len(index), channels, height, width)
    return images


def solarize(images: torch.Tensor, flags: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """PIL's ImageOps.solarize: pixels at or above the threshold are inverted, on the flagged samples."""
    if not flags.any():
        return images
    inverted = torch.where(images >= threshold - 1e-6, 1.0 - images, images)
    return torch.where(_per_sample(flags), inverted, images)


def photometric(images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarize, in DINO's order."""
    images = color_jitter(images, params)
    images = random_grayscale(images, params["grayscale"])
    images = gaussian_blur(images, params["blur"], params["sigma"])
    return solarize(images, params["solarize"])


# ------------------------------------------------------------------------------------------------ fused colour
#
# Brightness, contrast, saturation and greyscale are affine maps of each pixel's colour (contrast's grey level is
# the image mean, which an affine map carries along), and so is a hue shift once it is taken as a rotation of
# the colour cube about its grey diagonal: HSV's hue is the angle about that diagonal, measured on a hexagon
# rather than a circle. Each sample's whole ColorJitter, in its own order, then its greyscale and the
# normalisation compose into one 3 x 3 matrix and offset: one reduction and one batched matrix product over the
# uint8 crops instead of some thirty passes. What differs from the operation-by-operation definitions: one clamp
# at the end instead of one after each operation, and the hue rotated on a circle (lengths kept) instead of
# HSV's hexagon (largest and smallest channel kept).

_CROSS = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=torch.float64) / math.sqrt(3)


def hue_rotations(shifts: torch.Tensor) -> torch.Tensor:
    """Hue shifts [N] in turns (as ColorJitter's hue factor) -> RGB matrices [N, 3, 3] rotating colours about
    the grey diagonal by that angle, in the direction HSV's hue grows (red towards yellow); greys are fixed."""
    angle = (2 * math.pi * shifts.to(torch.float64)).view(-1, 1, 1)
    eye, grey = torch.eye(3, dtype=torch.float64), torch.full((3, 3), 1 / 3, dtype=torch.float64)
    return angle.cos() * eye + (1 - angle.cos()) * grey + angle.sin() * _CROSS


def color_matrices(params: Dict[str, torch.Tensor], means: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each sample's ColorJitter (its own order, where its `jitter` flag is set) and RandomGrayscale as one affine
    map y = A x + b of pixel colours in [0, 1], for images whose channel means are `means` [N, C].

    Returns A [N, C, C] and b [N, C] in float64, before any clamp."""
    n, channels = means.shape
    f64 = torch.float64
    eye = torch.eye(channels, dtype=f64).expand(n, channels, channels)
    weights = torch.tensor(GREY_WEIGHTS if channels == 3 else (1.0,), dtype=f64)
    luma = torch.ones(channels, 1, dtype=f64) * weights  # every channel becomes the grey level
    factor = {key: params[key].to(f64).view(n, 1, 1) for key in ("brightness", "contrast", "saturation")}
    steps = {0: factor["brightness"] * eye, 1: factor["contrast"] * eye}
    if channels == 3:  # saturation and hue leave grey images unchanged
        steps[2] = factor["saturation"] * eye + (1 - factor["saturation"]) * luma
        steps[3] = hue_rotations(params["hue"])
    matrix, offset = eye.clone(), torch.zeros(n, channels, dtype=f64)
    none = torch.full((n,), -1, dtype=torch.long)
    for position in range(4):
        chosen = torch.where(params["jitter"], params["order"][:, position], none)
        step = eye
        for op, candidate in steps.items():
            step = torch.where((chosen == op).view(n, 1, 1), candidate, step)
        # contrast blends with the grey level of the image as it is at this point: its mean is the map's image
        grey_mean = ((matrix @ means.to(f64)[..., None]).squeeze(-1) + offset) @ weights
        shift = torch.where(chosen == 1, (1 - factor["contrast"].view(n)) * grey_mean, torch.zeros(n, dtype=f64))
        matrix = step @ matrix
        offset = (step @ offset[..., None]).squeeze(-1) + shift[:, None]
    if channels == 3:
        grey = params["grayscale"].view(n, 1, 1)
        matrix = torch.where(grey, luma @ matrix, matrix)
        offset = torch.where(grey.view(n, 1), offset @ luma.T, offset)
    return matrix, offset


def photometric_fused(crops: torch.Tensor, params: Dict[str, torch.Tensor], mean: Sequence[float],
                      std: Sequence[float], channels: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crops [N, C, H, W] (uint8, or float in [0, 1]) -> photometric augmentation and normalisation in a few
    passes -> float32 [N, channels, H, W] (written into `out` when given).

    Colour jitter, greyscale and the normalisation are one affine map per sample (`color_matrices`) followed by
    one clamp to the normalised range of [0, 1]; blur (which commutes with a per-channel affine map) and
    solarize then run on the normalised values, on the flagged samples only. The passes run a few samples at a
    time, so that each piece is converted, mapped and clamped while it is in cache."""
    n, colors, height, width = crops.shape
    pixels = crops.reshape(n, colors, height * width)
    pieces = _chunks(n, colors * height * width)
    scale = 1 / 255 if crops.dtype == torch.uint8 else 1.0
    means = torch.cat([pixels[piece].float().mean(dim=2) for piece in pieces]).double() * scale
    matrix, offset = color_matrices(params, means)
    matrix = matrix * scale
    if channels != colors:  # grey data for an RGB model, or RGB data for a grey one
        spread = torch.ones(3, 1, dtype=torch.float64) if colors == 1 else torch.tensor([GREY_WEIGHTS], dtype=torch.float64)
        matrix, offset = spread @ matrix, offset @ spread.T
    mean_t = torch.tensor(list(mean), dtype=torch.float64)
    std_t = torch.tensor(list(std), dtype=torch.float64)
    matrix = (matrix / std_t.view(1, -1, 1)).float()
    offset = ((offset - mean_t) / std_t).float()[..., None]
    # the normalised range of [0, 1] per channel, as plain numbers: a clamp to scalar bounds runs several times
    # faster than one to bounds broadcast from a tensor
    bounds = list(zip((-mean_t / std_t).tolist(), ((1 - mean_t) / std_t).tolist()))
    if out is None:
        out = torch.empty(n, channels, height, width)
    flat = out.view(n, channels, height * width)
    for piece in pieces:
        torch.baddbmm(offset[piece], matrix[piece], pixels[piece].float(), out=flat[piece])
        for channel, (low, high) in enumerate(bounds):
            flat[piece, channel].clamp_(low, high)
    gaussian_blur(out, params["blur"], params["sigma"], inplace=True)
    # PIL's solarize at 128 of 255, in normalised units, channel by channel of each flagged sample in place
    thresholds = ((128 / 255 - 1e-6 - mean_t) / std_t).float().tolist()
    mirrors = ((1 - 2 * mean_t) / std_t).float().tolist()
    for index in params["solarize"].nonzero().flatten().tolist():
        for channel, (threshold, mirror) in enumerate(zip(thresholds, mirrors)):
            values = out[index, channel]
            torch.where(values >= threshold, mirror - values, values, out=values)
    return out


def match_channels(mean: Sequence[float], std: Sequence[float], channels: int) -> Tuple[List[float], List[float]]:
    """Normalisation statistics for `channels` channels: one value repeated for every channel, RGB ones averaged
    for grey. Any other count, a standard deviation that is not positive, or a value that is not finite is an
    InputError: these numbers would otherwise turn every image into NaN or into other numbers than those said."""

    def fit(values: Sequence[float], name: str) -> List[float]:
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"the normalisation {name} {values} must be finite numbers")
        if len(values) == channels:
            return values
        if len(values) == 1:
            return values * channels
        if len(values) == 3 and channels == 1:
            return [sum(values) / 3]
        counts = "1 (or 3, averaged)" if channels == 1 else f"1 or {channels}"
        raise InputError(f"the normalisation {name} {values} has {len(values)} values for {channels}-channel images: "
                         f"give {counts}")

    mean, std = fit(mean, "mean"), fit(std, "std")
    if min(std) <= 0:
        raise InputError(f"the normalisation std {std} must be positive (images are divided by it)")
    return mean, std


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels: int) -> torch.Tensor:
    """(x - mean) / std, giving `channels` channels (grey data is repeated for 3-channel models)."""
    if images.shape[1] != channels:
        images = images.expand(-1, channels, -1, -1) if images.shape[1] == 1 else to_grey(images)
    mean_t = torch.tensor(list(mean), dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
