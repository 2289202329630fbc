"""Decoding images and the paired transform: one resize, crop and flip for both images of a pair."""

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

#: Transparent pixels are composited over white, as a browser or an image viewer shows them on a page (PIL's
#: `convert("RGB")` would drop the alpha and show whatever colour the transparent pixels happen to hold).
ALPHA_BACKGROUND = (255, 255, 255)
#: Modes of 16/32-bit integer images, read on a 16-bit scale (0..65535): PIL's `convert` clips them to 0..255, which
#: turns a 16-bit PNG white.
WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image that looks as the file does in a viewer, whatever its mode and bit depth.

    EXIF orientation is applied; 16-bit and 32-bit integer greyscale is scaled from 0..65535, float greyscale ("F")
    from 0..1 (values outside are clipped); alpha (RGBA, LA, PA, a palette or greyscale with a transparent colour) is
    composited over `ALPHA_BACKGROUND`; every other mode (L, P, CMYK, YCbCr, 1, ...) goes through PIL's conversion.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_INTEGER_MODES or image.mode == "F":
        scale = 1.0 if image.mode == "F" else 65535.0
        levels = np.clip(np.asarray(image, dtype=np.float64) / scale, 0.0, 1.0) * 255.0
        return Image.fromarray(np.rint(levels).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(value, row: int, column: str) -> Image.Image:
    """Decode any supported image value to RGB (`to_rgb`: every mode and bit depth as it looks), or raise an error
    naming the row and column."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            raise TypeError(f"unsupported value of type {type(value).__name__}")
        return to_rgb(image)
    except Exception as exc:  # PIL raises several unrelated types for bad data
        raise ValueError(
            f"Row {row}, column {column!r}: could not read an image ({exc}). Expected a PIL image, a datasets.Image "
            "value, encoded image bytes or a path to an image file."
        ) from exc


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to `size`."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    new = _resized_size(image.width, image.height, size)
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def flipped_crop_top_left(original_size, crop_top_left, resolution: int) -> tuple[int, int]:
    """The crop's (top, left) after a horizontal flip, in the flipped resized image (SDXL's `crops_coords_top_left`).

    Flipping the crop equals cropping the flipped resized image at the mirrored position, so `left` becomes the free
    space minus `left`.
    """
    (height, width), (top, left) = original_size, crop_top_left
    resized_width, _ = _resized_size(width, height, resolution)
    return top, resized_width - resolution - left


def paired_transform(images, resolution: int, random_crop: bool = False, random_flip: bool = False, generator=None):
    """Resize, crop and flip the images of one pair with ONE draw of crop position and flip.

    The crop position is drawn as a fraction of the free space, so images of equal size get identical crops and
    images of different sizes get corresponding ones. Returns pixel tensors in [-1, 1] and, per image, the SDXL
    micro-conditioning: original (h, w) and the crop's top-left (top, left) in the resized image, measured in the
    flipped frame when flipped. Draws come from `generator` (default: torch's global generator).
    """
    fy, fx = torch.rand(2, generator=generator).tolist() if random_crop else (0.5, 0.5)
    flip = bool(random_flip and torch.rand((), generator=generator).item() < 0.5)
    pixels, original_sizes, crops = [], [], []
    for image in images:
        original_sizes.append((image.height, image.width))
        resized = _resize_short_side(image, resolution)
        top = round(fy * (resized.height - resolution))
        left = round(fx * (resized.width - resolution))
        cropped = resized.crop((left, top, left + resolution, top + resolution))
        if flip:
            cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            top, left = flipped_crop_top_left(original_sizes[-1], (top, left), resolution)
        pixels.append(_to_tensor(cropped))
        crops.append((top, left))
    return pixels, original_sizes, crops
