"""Decoding images and the paired transform: one resize, crop and flip for both images of a pair."""

import io
import os

import numpy as np
import torch
from PIL import Image


def load_image(value, row: int, column: str) -> Image.Image:
    """Decode any supported image value to RGB, or raise an error naming the row and column."""
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
        return image.convert("RGB")
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
