"""CLIP-based rewards loaded with transformers, by hub id or local path, preprocessed by the model's own processor
(as PickScore's and Diffusion-DPO's evaluation code do):

- `CLIPScore`: 100 x cosine similarity of image and prompt embeddings (the usual "CLIP score" scale).
- `PickScore`: a CLIP model fine-tuned on human preferences, scored with its learned temperature
  (`logit_scale.exp()` x cosine), as in Kirstain et al. 2023. Default: `yuvalkirstain/PickScore_v1` with the
  processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
"""

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from .base import ModelReward


class CLIPScore(ModelReward):
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
                 batch_size: int = 16):
        if model is None:  # the default model comes with its default processor
            model, processor = self.default_model, processor or self.default_processor
        self.model = CLIPModel.from_pretrained(model, dtype=dtype)
        self._place(device, dtype)
        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.batch_size = batch_size

    def scale(self) -> float:
        return 100.0

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(
            text=prompts,
            images=[image.convert("RGB") for image in images],
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        # The forward pass returns normalised embeddings in every transformers version.
        output = self.model(**inputs)
        return self.scale() * (output.image_embeds * output.text_embeds).sum(dim=-1)


class PickScore(CLIPScore):
    """A CLIP preference model (PickScore and its kind), scored as `logit_scale.exp()` x cosine."""

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def scale(self) -> float:
        return float(self.model.logit_scale.exp())
