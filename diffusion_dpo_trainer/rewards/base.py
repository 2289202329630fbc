"""What every reward model shares: input checks, batching, checkpoint files, and the reference preprocessing.

A reward model scores `(images, prompts)` in batches of `batch_size`; the score of an image never depends on the
other images of its batch (no padding to the batch's longest prompt leaks into a score: the text models are causal
or masked), so a batch size is a speed setting, not a result setting.

Preprocessing follows each model's reference code to the pixel, because reward numbers drift with it:

- `resize_center_crop`: torchvision's `Resize(size, BICUBIC)` then `CenterCrop(size)` on a PIL image (OpenAI CLIP,
  ImageReward/BLIP): the short side becomes `size` (the long side `int(size * long / short)`), PIL bicubic, and the
  crop offset is `round((side - size) / 2)`.
- `resize_longest_pad`: HPSv2's `ResizeMaxSize`: the image as a [0, 1] tensor, the LONG side resized to `size`
  (bicubic, antialiased, on floats), then zero-padded to a square.
- `normalize`: per-channel `(x - mean) / std`, with the OpenAI CLIP constants for every model here.
"""

import abc
import importlib
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OpenAI CLIP's normalisation constants: also those of open_clip's ViT-H-14 (HPSv2) and of BLIP (ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXTRA_HINT = 'pip install "diffusion-dpo-trainer[{extra}]"'


def require(module: str, reward: str, extra: str = "rewards"):
    """Import an optional dependency of a reward, or fail with the command that installs it (`extra` names the
    setup.py extra that holds it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = EXTRA_HINT.format(extra=extra)
        raise ImportError(f"The {reward} reward needs the `{module}` package: {hint}") from exc


def check_inputs(images, prompts) -> None:
    """One prompt per image, and every image a PIL image: errors name the position and what was expected."""
    if isinstance(prompts, str) or isinstance(images, Image.Image):
        raise TypeError("Expected a list of images and a list of prompts (one prompt per image), not a single item.")
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; expected one prompt per image.")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}]: expected a PIL.Image.Image, got {type(image).__name__}.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}]: expected a string, got {type(prompt).__name__}.")


def checkpoint_file(path_or_repo: str, filename: str) -> str:
    """A local file as is, else `filename` downloaded from the Hub repository `path_or_repo`."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if os.path.isdir(path_or_repo):
        return os.path.join(path_or_repo, filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, filename)


def load_torch_checkpoint(path: str) -> dict:
    """A `torch.save`d state dict (tensors only: `weights_only=True`), unwrapped from `{"state_dict": ...}`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {key.removeprefix("module."): value for key, value in state.items()}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's `ToTensor`: RGB uint8 HWC -> float CHW in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(new_size, Image.BICUBIC)
    width, height = image.size
    if width < size or height < size:  # torchvision pads with zeros first; only tiny images get here
        canvas = Image.new("RGB", (max(width, size), max(height, size)))
        canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
        image, (width, height) = canvas, canvas.size
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def resize_longest_pad(pixels: torch.Tensor, size: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        pixels = F.interpolate(pixels[None], size=(new_height, new_width), mode="bicubic", align_corners=False,
                               antialias=True)[0]
        pad_h, pad_w = size - new_height, size - new_width
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return pixels


def normalize(pixels: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=pixels.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype).view(-1, 1, 1)
    return (pixels - mean) / std


class ModelReward(abc.ABC):
    """Base of the reward models: checks the inputs, batches them, returns one float per image.

    Subclasses set `self.model` (an `nn.Module`, for device and dtype) and implement `score_batch`; one that does not
    cannot be instantiated.
    """

    batch_size: int = 16

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _place(self, device, dtype) -> None:
        self.model.eval().requires_grad_(False)
        self.model.to(device=device, dtype=dtype)

    @abc.abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """One score per image of a checked batch (at most `batch_size` images), in any float dtype."""

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        check_inputs(images, prompts)
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch = self.score_batch(list(images[start : start + self.batch_size]),
                                     list(prompts[start : start + self.batch_size]))
            scores.extend(batch.float().flatten().tolist())
        return scores
