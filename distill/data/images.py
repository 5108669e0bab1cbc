"""Decoding one image file into RGB or grey, whatever its mode: RGBA, LA, palette, CMYK, 16-bit, float."""

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images scaled to 8 bits by their dtype's range (not their content)."""
    array = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0 if array.max() <= 1.0 else np.clip(array, 0, 255)
    else:
        scaled = array.astype(np.float64) / (65535.0 if array.max() > 255 else 255.0) * 255.0
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
