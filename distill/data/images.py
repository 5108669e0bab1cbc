"""Decoding one image file into RGB or grey, whatever its mode: RGBA, LA, palette, CMYK, 16-bit, float."""

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


# the largest value of each high-depth mode's pixels; "I" (32-bit) images come from 16-bit files (PNG, TIFF) as
# often as not, so they are read on the 16-bit range, and clipped above it
_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images scaled to 8 bits by their type's range (a dark 16-bit image stays dark,
    whatever its largest value); float images ("F") by [0, 1] when they hold no value above 1, else clipped to
    [0, 255]."""
    array = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0 if array.max() <= 1.0 else np.clip(array, 0, 255)
    else:
        scaled = np.clip(array.astype(np.float64), 0, _FULL_SCALE[img.mode]) / _FULL_SCALE[img.mode] * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Transparent pixels become white (as viewers show them) instead of whatever colour they hide."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to "RGB" or "L"."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_depth_to_8bit(img)
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    if img.mode != mode:
        img = img.convert(mode)  # CMYK, YCbCr, LAB, HSV, P, 1, L <-> RGB
    return img


def load_image(path: Union[str, Path], mode: str = "RGB", min_size: int = 0) -> Image.Image:
    """Open, fully decode (so truncated files fail here), apply EXIF orientation, convert to `mode`, and
    upscale so that the shorter side is at least `min_size` pixels (small images still give full crops)."""
    with Image.open(path) as handle:
        handle.load()
        img = ImageOps.exif_transpose(handle)
        img = to_mode(img, mode)
    if min_size and min(img.size) < min_size:
        scale = min_size / min(img.size)
        size = (max(min_size, round(img.width * scale)), max(min_size, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def set_max_image_pixels(limit: int) -> None:
    """Pillow's decompression-bomb limit (images with more pixels are refused): 0 keeps Pillow's default
    (about 89 million), -1 removes it."""
    if limit:
        Image.MAX_IMAGE_PIXELS = None if limit < 0 else int(limit)


def describe_error(error: Exception) -> str:
    """Why a file could not be decoded, in one line that says what to do where there is something to do."""
    if isinstance(error, Image.DecompressionBombError):
        return (f"{str(error).split(' could be')[0].rstrip(',')}; Pillow refuses images that large as possible decompression "
                "bombs: raise data.dataset.max_image_pixels (or --max-image-pixels) if you trust the file")
    if isinstance(error, FileNotFoundError):
        return "the file does not exist (any more)"
    if isinstance(error, IsADirectoryError):
        return "a folder, not an image file"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "cannot identify image file" in text:
        return "not an image file Pillow can read (or a damaged one)"
    return text[:200]
