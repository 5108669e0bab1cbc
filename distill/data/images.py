"""Decoding one image file into RGB or grey, whatever its mode: RGBA, LA, palette, CMYK, 16-bit, float.

JPEG files can also be decoded at the size their crops need (`load_image_at_crop_size`): the crop boxes are
drawn on the full image's size, read from the header, and the DCT is decoded at 1/2, 1/4 or 1/8 of it when every
box is still at least its output size there; a `Frame` says where the full image's coordinates lie in the
reduced one, so that each crop is cut from its box's place there.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

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


def _upscaled(img: Image.Image, min_size: int) -> Image.Image:
    """`img` resized (bicubic) so that its shorter side is at least `min_size` pixels; unchanged if it is."""
    if min_size and min(img.size) < min_size:
        scale = min_size / min(img.size)
        size = (max(min_size, round(img.width * scale)), max(min_size, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def open_image(path: Union[str, Path]) -> Image.Image:
    """Image.open, where an image over Pillow's decompression-bomb limit (max_image_pixels) is refused as one over
    twice the limit is: Pillow itself only warns between the two, and such a file would then be trained on. (The
    size is checked here rather than the warning made an error: warning filters are not thread-safe, and files
    are checked in threads.)"""
    handle = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    pixels = handle.size[0] * handle.size[1]
    if limit and pixels > limit:
        handle.close()
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of {int(limit)} pixels, "
                                           "could be decompression bomb DOS attack.")
    return handle


def load_image(path: Union[str, Path], mode: str = "RGB", min_size: int = 0) -> Image.Image:
    """Open, fully decode (so truncated files fail here), apply EXIF orientation, convert to `mode`, and
    upscale so that the shorter side is at least `min_size` pixels (small images still give full crops)."""
    with open_image(path) as handle:
        handle.load()
        img = ImageOps.exif_transpose(handle)
        img = to_mode(img, mode)
    return _upscaled(img, min_size)


JPEG_REDUCTIONS = (2, 4, 8)  # the DCT scalings Pillow's draft offers (libjpeg's scale_denom with scale_num 1)

# EXIF orientation -> the transposition it asks for swaps width and height
_SWAPS_AXES = (5, 6, 7, 8)
# EXIF orientation -> which edge of the stored image comes to the left and to the top once oriented: "x" where it
# is the stored right edge, "y" where it is the stored bottom edge (None: the stored left or top edge)
_FAR_EDGES = {1: (None, None), 2: ("x", None), 3: ("x", "y"), 4: (None, "y"), 5: (None, None), 6: ("y", None),
              7: ("y", "x"), 8: (None, "x")}


@dataclass(frozen=True)
class Frame:
    """The full image's coordinates, which crop boxes are drawn in, and where they lie in the decoded image:
    point (x, y) of the full image (oriented, upscaled to min_size) is point (left + x * scale, top + y * scale)
    of the decoded one. A full decode has scale 1 and no offset; a reduced JPEG decode has scale 1/2, 1/4 or
    1/8, and an offset below one decoded pixel where orientation brings a partly covered last column or row of
    the stored image to the left or top."""

    width: int
    height: int
    scale: float = 1.0
    left: float = 0.0
    top: float = 0.0

    @property
    def reduced(self) -> bool:
        return self.scale != 1.0

    def box(self, top: int, left: int, height: int, width: int) -> Tuple[int, int, int, int]:
        """A box (top, left, height, width) of the full image as the same in the decoded image: each edge at the
        decoded pixel edge nearest its exact place (half a decoded pixel away at most; ties to even, so no side
        is favoured). Exact for a full decode."""
        if not self.reduced:
            return top, left, height, width
        y0, x0 = round(self.top + top * self.scale), round(self.left + left * self.scale)
        y1 = round(self.top + (top + height) * self.scale)
        x1 = round(self.left + (left + width) * self.scale)
        return y0, x0, y1 - y0, x1 - x0


def _draft(handle: JpegImageFile, factor: int, orientation: int) -> Tuple[float, float, float]:
    """Ask the JPEG decoder for 1/factor of the stored size (the DCT decoded at that size, no full-size pass);
    (scale, left, top) of the full image in the result once given its EXIF orientation (see Frame)."""
    stored_width, stored_height = handle.size
    drafted = handle.draft(handle.mode, (stored_width // factor, stored_height // factor))
    if drafted is None:  # a JPEG Pillow cannot scale (several tiles): decoded in full
        return 1.0, 0.0, 0.0
    _, (_, _, extent_x, extent_y) = drafted  # the full image's extent in decoded pixels
    scale = extent_x / stored_width
    # the last decoded column (row) covers the stored image's edge and padding beyond it; where orientation
    # brings that edge to the left (top), the full image starts that far into the oriented result
    slack = {"x": handle.size[0] - extent_x, "y": handle.size[1] - extent_y, None: 0.0}
    edge_x, edge_y = _FAR_EDGES.get(orientation, (None, None))
    return scale, slack[edge_x], slack[edge_y]


def load_image_at_crop_size(path: Union[str, Path], mode: str, min_size: int,
                            reduction: Callable[[int, int], float]) -> Tuple[Image.Image, Frame]:
    """`load_image`, but a JPEG is decoded at the size its crops need: `reduction(width, height)` is called
    once, before any decoding, with the full image's size (oriented, upscaled to min_size), the frame the crop
    boxes are drawn in; it returns how many times smaller the image may be decoded with every crop box still
    at least its output size, and the largest of JPEG's scalings (1/2, 1/4, 1/8) within that is used. The result
    is the decoded image and its Frame.

    Only JPEG files larger than min_size are reduced; any other file, and a factor of 1, give exactly
    `load_image`'s image. A reduced image is still decoded to the file's end (a truncated file fails as
    before), then oriented and converted like a full one; what changes is the resampling: JPEG's DCT scaling
    instead of the crop's own antialiasing over the dropped resolution."""
    frame: Optional[Frame] = None
    with open_image(path) as handle:
        if isinstance(handle, JpegImageFile):
            orientation = handle.getexif().get(ExifTags.Base.Orientation, 1)  # as exif_transpose reads it
            width, height = handle.size[::-1] if orientation in _SWAPS_AXES else handle.size
            if min(width, height) >= min_size:  # no upscaling: the header's size is the frame
                allowed = reduction(width, height)
                factor = max((f for f in JPEG_REDUCTIONS if f <= allowed), default=1)
                scale, left, top = _draft(handle, factor, orientation) if factor > 1 else (1.0, 0.0, 0.0)
                frame = Frame(width, height, scale, left, top)
        handle.load()
        img = ImageOps.exif_transpose(handle)
        img = to_mode(img, mode)
    if frame is None:
        img = _upscaled(img, min_size)
        frame = Frame(img.width, img.height)
        reduction(img.width, img.height)  # the boxes are drawn all the same, on the image the crops come from
    return img, frame


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
