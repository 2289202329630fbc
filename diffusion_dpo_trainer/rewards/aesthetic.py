"""The LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor).

An MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, dropout only in training) on the L2-normalised
CLIP ViT-L/14 image embedding; the prompt is not used. Scores are on the AVA scale, about 1-10 (5-6 for typical
generations). The weights `sac+logos+ava1-l14-linearMSE.pth` are a plain state dict (`layers.{0,2,4,6,7}.*`),
hosted on the Hub by `camenduru/improved-aesthetic-predictor`; CLIP ViT-L/14 is `openai/clip-vit-large-patch14`,
preprocessed by its own processor, as Diffusion-DPO's evaluation code (`utils/aes_utils.py`) does.
"""

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, CLIPVisionModelWithProjection
from transformers.utils import logging

from .base import ModelReward, checkpoint_file, load_torch_checkpoint

AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def aesthetic_head(embed_dim: int = 768) -> nn.Sequential:
    """The predictor's MLP, with the reference's module indices (so its state dict loads by name)."""
    return nn.Sequential(nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class _Aesthetic(nn.Module):
    def __init__(self, clip: CLIPVisionModelWithProjection):
        super().__init__()
        self.clip = clip
        self.layers = aesthetic_head(clip.config.projection_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.clip(pixel_values=pixel_values).image_embeds
        return self.layers(embeds / embeds.norm(dim=-1, keepdim=True))


class AestheticScore(ModelReward):
    """LAION aesthetic score of each image (prompts are checked but not used).

    Args:
        head: a local `.pth` file or a Hub repository with `sac+logos+ava1-l14-linearMSE.pth`.
        clip: hub id or local path of the CLIP ViT-L/14 model and processor.
        device, dtype, batch_size: where, in which precision and how many images per forward pass.
    """

    def __init__(self, head: str | None = None, clip: str = "openai/clip-vit-large-patch14", device=None,
                 dtype=None, batch_size: int = 16):
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # loading the image tower of a full CLIP checkpoint lists every text weight
        try:
            self.model = _Aesthetic(CLIPVisionModelWithProjection.from_pretrained(clip))
        finally:
            logging.set_verbosity(verbosity)
        weights = load_torch_checkpoint(checkpoint_file(head or AESTHETIC_REPO, AESTHETIC_FILE))
        self.model.layers.load_state_dict({k.removeprefix("layers."): v for k, v in weights.items()})
        self._place(device, dtype)
        self.processor = AutoProcessor.from_pretrained(clip)
        self.batch_size = batch_size

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        return self.model(pixels.to(self.device, self.dtype))
