"""Reward functions: `reward_fn(images: list[PIL.Image], prompts: list[str]) -> list[float]`, higher is better.

Any callable with that signature labels AI-feedback pairs (`feedback.py`) and judges win rates (`evaluation.py`).
For video pipelines the samples are videos (lists of PIL frames): any callable on lists of frames works, and
`frame_averaged` turns an image reward into a video reward.
The ready-made ones are CLIP models loaded with transformers, by hub id or local path:

- `CLIPScore`: 100 x cosine similarity of image and prompt embeddings (the usual "CLIP score" scale).
- `PickScore`: a CLIP model fine-tuned on human preferences, scored with its learned temperature
  (`logit_scale.exp()` x cosine), as in Kirstain et al. 2023. Default: `yuvalkirstain/PickScore_v1` with the
  processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
"""

import importlib
from collections.abc import Callable, Sequence
from itertools import pairwise

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

RewardFn = Callable[[list[Image.Image], list[str]], Sequence[float]]


class CLIPScore:
    """100 x cos(image, prompt) under a CLIP model.

    Args:
        model: hub id or local path of a `CLIPModel`.
        processor: hub id or path of its processor (tokenizer + image processor); defaults to `model`'s own
            (or, when `model` is not given either, to the class's default processor).
        device, dtype: where and in which precision to run the model.
        batch_size: images scored per forward pass.
    """

    default_model = "openai/clip-vit-large-patch14"
    default_processor = None

    def __init__(self, model: str | None = None, processor: str | None = None, device=None, dtype=None,
                 batch_size: int = 32):
        if model is None:  # the default model comes with its default processor
            model, processor = self.default_model, processor or self.default_processor
        self.model = CLIPModel.from_pretrained(model, dtype=dtype).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.batch_size = batch_size

    def scale(self) -> float:
        return 100.0

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; expected one prompt per image.")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(
                text=list(prompts[start : start + self.batch_size]),
                images=[image.convert("RGB") for image in images[start : start + self.batch_size]],
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            # The forward pass returns normalised embeddings in every transformers version.
            output = self.model(**inputs)
            cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
            scores.extend((self.scale() * cosine).float().tolist())
        return scores


class PickScore(CLIPScore):
    """A CLIP preference model (PickScore and its kind), scored as `logit_scale.exp()` x cosine."""

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def scale(self) -> float:
        return float(self.model.logit_scale.exp())


REWARDS = {"clip": CLIPScore, "clip-score": CLIPScore, "pickscore": PickScore}


def load_reward(name: str | RewardFn, **kwargs) -> RewardFn:
    """A reward function from a simple name, as a command line gives it.

    - a callable is returned as is;
    - `"clip"`/`"clip-score"` or `"pickscore"`: the default model of `CLIPScore`/`PickScore`;
    - `"clip:<id or path>"` / `"pickscore:<id or path>"`: that CLIP model, scored that way;
    - `"package.module:function"`: any importable reward function (or class, instantiated with `kwargs`).
    """
    if callable(name):
        return name
    kind, _, target = name.partition(":")
    if kind.lower() in REWARDS:
        return REWARDS[kind.lower()](target or None, **kwargs)
    if target:
        try:
            obj = getattr(importlib.import_module(kind), target)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"Could not import reward {name!r}: {exc}") from exc
        return obj(**kwargs) if isinstance(obj, type) else obj
    raise ValueError(
        f"Unknown reward {name!r}; expected one of {sorted(REWARDS)}, '<kind>:<model id or path>' or "
        "'package.module:function'."
    )


def frame_averaged(image_reward: RewardFn | str, num_frames: int = 4) -> RewardFn:
    """A video reward from an image reward: per video, the mean of the image reward on `num_frames` frames spread
    evenly over it (first and last included; every frame of a shorter video). All frames of a batch are scored in
    one call of `image_reward` (a callable or a `load_reward` name)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    image_reward = load_reward(image_reward)

    def reward(videos: list[list[Image.Image]], prompts: list[str]) -> list[float]:
        picked = [[video[i] for i in np.linspace(0, len(video) - 1, min(num_frames, len(video))).round().astype(int)]
                  for video in videos]
        scores = [float(s) for s in image_reward([f for frames in picked for f in frames],
                                                 [p for p, frames in zip(prompts, picked) for _ in frames])]
        bounds = np.cumsum([0] + [len(frames) for frames in picked])
        return [float(np.mean(scores[a:b])) for a, b in pairwise(bounds)]

    return reward
