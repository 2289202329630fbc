"""ImageReward v1.0 (Xu et al. 2023, github.com/THUDM/ImageReward) on transformers' BLIP modules.

The `image-reward` package cannot be used here: it imports `apply_chunking_to_forward` and friends from
`transformers.modeling_utils` (gone in transformers 5), and it requires `fairscale`, `timm` and OpenAI's `clip`
from GitHub. Its model is BLIP's: a ViT-L/16 image encoder (224 px, LayerNorm eps 1e-6), a BERT-base text encoder
with cross-attention to the image tokens (vocabulary of bert-base-uncased plus `[DEC]` and `[ENC]`: 30524), and an
MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) on the text encoder's first ([CLS]) token. transformers'
`BlipVisionModel` and `BlipTextModel` are these modules with (nearly) the same parameter names, so
`ImageReward.pt` (Hub `THUDM/ImageReward`) loads into them after `blip_to_transformers`.

As the reference `ImageReward.score`: the prompt is tokenized by bert-base-uncased's tokenizer, padded to 35
tokens (truncated beyond), the [CLS] token kept; the image is resized (short side 224, bicubic), center-cropped to
224 and normalised with OpenAI CLIP's mean/std; the reward is `(mlp(cls) - 0.16717362830052426) / 1.0333394966054072`.
"""

import torch
from accelerate import init_empty_weights
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from .aesthetic import aesthetic_head
from .base import ModelReward, checkpoint_file, load_torch_checkpoint, normalize, resize_center_crop, to_tensor

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
TOKENIZER = "google-bert/bert-base-uncased"
# The reference's normalisation of the MLP output (ImageReward.py: self.mean, self.std).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
IMAGE_SIZE = 224
VISION_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "image_size": IMAGE_SIZE, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
TEXT_CONFIG = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "max_position_embeddings": 512, "encoder_hidden_size": 1024,
                   "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
VISION_NAMES = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                ("attn.proj", "self_attn.projection"))


def blip_to_transformers(state: dict) -> dict[str, dict]:
    """ImageReward's state dict as `{"vision": ..., "text": ..., "mlp": ...}` in transformers' BLIP names.

    Only the modules ImageReward scores with are taken (the checkpoint's other BLIP heads, if any, are not used).
    """
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name.startswith("blocks."):
                name = "encoder.layers." + name.removeprefix("blocks.")
                for theirs, ours in VISION_NAMES:
                    name = name.replace(f".{theirs}.", f".{ours}.")
            else:
                name = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                        "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}.get(name, name)
            vision[name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            mlp[key.removeprefix("mlp.layers.")] = value
    return {"vision": vision, "text": text, "mlp": mlp}


class _ImageReward(nn.Module):
    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = aesthetic_head(text_config.hidden_size)  # the same MLP shape as the aesthetic predictor

    def forward(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        cls = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask).last_hidden_state[:, 0]
        return (self.mlp(cls) - REWARD_MEAN) / REWARD_STD


class ImageReward(ModelReward):
    """ImageReward v1.0 score of each (image, prompt).

    Args:
        checkpoint: a local `ImageReward.pt`, or a Hub repository holding it (default `THUDM/ImageReward`).
        tokenizer: hub id or local path of the BERT tokenizer (bert-base-uncased's vocabulary).
        vision_config, text_config: overrides of the architecture (tests use tiny ones).
        device, dtype, batch_size: where, in which precision and how many images per forward pass.
    """

    def __init__(self, checkpoint: str | None = None, tokenizer: str = TOKENIZER, vision_config: dict | None = None,
                 text_config: dict | None = None, device=None, dtype=None, batch_size: int = 16):
        parts = blip_to_transformers(load_torch_checkpoint(checkpoint_file(checkpoint or IMAGEREWARD_REPO,
                                                                            IMAGEREWARD_FILE)))
        vision = BlipVisionConfig(**{**VISION_CONFIG, **(vision_config or {})})
        text = BlipTextConfig(**{**TEXT_CONFIG, **(text_config or {})})
        with init_empty_weights():
            self.model = _ImageReward(vision, text)
        try:
            for name in ("vision", "text", "mlp"):
                getattr(self.model, name).load_state_dict(parts[name], strict=True, assign=True)
        except RuntimeError as exc:  # missing, unexpected or mis-shaped weights: say which file and what it is not
            raise ValueError(f"{checkpoint or IMAGEREWARD_REPO} is not an ImageReward v1.0 checkpoint of the expected "
                             f"architecture: {exc}") from exc
        self._place(device, dtype or torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.image_size = vision.image_size
        self.batch_size = batch_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return normalize(to_tensor(resize_center_crop(image, self.image_size)))

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                              return_tensors="pt").to(self.device)
        return self.model(text.input_ids, text.attention_mask, pixels)
