"""Tiny data and reward models for tests: separable preference pairs and a small CLIP."""

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from .common import _clip_text_encoder, _seeded, write_clip_tokenizer

_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}



def make_preference_dataset(n=8, size=32, seed=0):
    """Toy preference data: ``chosen`` is a solid colour matching the prompt, ``rejected`` is uniform noise.

    The two classes are trivially separable, so a working DPO loop should
    quickly learn to prefer the chosen images.
    """
    rng = np.random.default_rng(seed)
    names = list(_COLOURS)
    prompts, chosen, rejected = [], [], []
    for i in range(n):
        name = names[i % len(names)]
        prompts.append(f"a solid {name} square")
        chosen.append(Image.new("RGB", (size, size), _COLOURS[name]))
        noise = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        rejected.append(Image.fromarray(noise))
    features = Features({"prompt": Value("string"), "chosen": ImageFeature(), "rejected": ImageFeature()})
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}, features=features)


def make_clip_model(path, image_size=32, seed=0):
    """Build and save a tiny random CLIPModel with its processor (CLIP tokenizer + PIL image processor).

    Loads with `CLIPModel.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)` like
    openai/clip-vit-large-patch14 or PickScore, so reward wrappers run their real loading code.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = write_clip_tokenizer(path)
    text_config = _clip_text_encoder(tokenizer, seed).config.to_dict()
    vision_config = dict(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=32,
    )
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)
