"""Check our reward loaders against the reference packages' own code, on tiny random checkpoints.

The library converts the HPSv2 (open_clip) and ImageReward (BLIP, timm-style ViT) checkpoints to transformers
modules and re-implements their torchvision preprocessing, so that it needs neither open_clip nor torchvision.
This script runs the originals next to ours and prints the largest differences. It needs open_clip, timm and a
torchvision that matches your torch, which the test suite does not install:

    python -m venv --system-site-packages /tmp/refvenv
    /tmp/refvenv/bin/pip install open-clip-torch timm torchvision   # a torchvision built for your torch
    PYTHONPATH=$PWD /tmp/refvenv/bin/python scripts/check_rewards_against_references.py

(With the CPU-only torch 2.13.0+cpu, the PyPI torchvision 0.28.0 wheel, built for CUDA, fails to register its C++
ops at import; only its Python transforms are needed here, so in that throwaway venv its `_meta_registrations.py`
and `_autograd_registrations.py` were emptied. The results below do not use those ops.)

Compared: (1) HPSv2's evaluation transform (ToTensor, ResizeMaxSize: longest side, bicubic, zero pad, Normalize)
with `resize_longest_pad`, and open_clip's `CLIP` forward with our `HPSv2` score; (2) the OpenAI-CLIP/ImageReward
transform (Resize, CenterCrop, ToTensor, Normalize) with `resize_center_crop`, and timm's `VisionTransformer`
(the module BLIP's ViT is) with our ImageReward image tower.
"""

import sys
import tempfile
from functools import partial

import numpy as np
import open_clip
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from diffusion_dpo_trainer.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    normalize,
    resize_center_crop,
    resize_longest_pad,
    to_tensor,
)
from diffusion_dpo_trainer.rewards.hps import HPSv2
from diffusion_dpo_trainer.rewards.imagereward import ImageReward
from diffusion_dpo_trainer.testing.rewards import OPEN_CLIP_TINY, make_hps_model, make_imagereward_model


def hps_transform(size):
    """HPSv2's `image_transform(..., is_train=False, resize_longest_max=True)`, with torchvision."""
    def resize_max_size(img):
        height, width = img.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_size[0], size - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return img

    return Compose([lambda im: im.convert("RGB"), ToTensor(), resize_max_size, Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def clip_transform(size):
    """OpenAI CLIP's `_transform` (also ImageReward's)."""
    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def test_images():
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 40), (40, 64), (33, 31), (512, 384), (35, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def main() -> int:
    worst = {}
    images, prompts = test_images(), ["a red square", "a photo of a cat", "the blue circle", "a painting", "a", "dog"]
    for size in (32, 224):
        ours = torch.stack([normalize(resize_longest_pad(to_tensor(im), size)) for im in images])
        ref = torch.stack([hps_transform(size)(im) for im in images])
        worst[f"HPSv2 preprocessing, {size} px"] = (ours - ref).abs().max().item()
        ours = torch.stack([normalize(to_tensor(resize_center_crop(im, size))) for im in images])
        ref = torch.stack([clip_transform(size)(im) for im in images])
        worst[f"CLIP/ImageReward preprocessing, {size} px"] = (ours - ref).abs().max().item()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, clip_dir = make_hps_model(f"{tmp}/hps")
        s = OPEN_CLIP_TINY
        reward = HPSv2(checkpoint, clip=clip_dir)
        model = open_clip.model.CLIP(
            embed_dim=s["embed_dim"],
            vision_cfg=open_clip.model.CLIPVisionCfg(layers=s["layers"], width=s["width"],
                                                     head_width=s["width"] // s["heads"],
                                                     patch_size=s["patch_size"], image_size=s["image_size"]),
            text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=len(reward.tokenizer),
                                                 width=s["text_width"], heads=s["text_heads"], layers=s["text_layers"]),
        ).eval()
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        tokens = torch.zeros(len(prompts), 77, dtype=torch.long)  # open_clip pads with 0
        for row, prompt in enumerate(prompts):
            ids = reward.tokenizer(prompt).input_ids
            tokens[row, : len(ids)] = torch.tensor(ids)
        with torch.no_grad():
            pixels = torch.stack([hps_transform(s["image_size"])(im) for im in images])
            out = model(pixels, tokens)
            ref = (out["image_features"] * out["text_features"]).sum(-1) if isinstance(out, dict) else \
                (out[0] * out[1]).sum(-1)
        worst["HPSv2 score vs open_clip"] = float(np.abs(np.array(reward(images, prompts)) - ref.numpy()).max())

        checkpoint, tokenizer, vision, text = make_imagereward_model(f"{tmp}/ir")
        reward = ImageReward(checkpoint, tokenizer=tokenizer, vision_config=vision, text_config=text)
        vit = timm.models.vision_transformer.VisionTransformer(
            img_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=vision["hidden_size"],
            depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"], qkv_bias=True, num_classes=0,
            global_pool="", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
        state = torch.load(checkpoint, weights_only=True)
        vit.load_state_dict({k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
                             if k.startswith("blip.visual_encoder.")}, strict=True)
        with torch.no_grad():
            pixels = torch.stack([clip_transform(vision["image_size"])(im) for im in images])
            ref = vit.forward_features(pixels)
            ours = reward.model.vision(pixel_values=pixels).last_hidden_state
        worst["ImageReward image tower vs timm ViT"] = (ours - ref).abs().max().item()

    print(f"open_clip {open_clip.__version__}, timm {timm.__version__}, torch {torch.__version__}")
    for name, value in worst.items():
        print(f"{name:45s} max |ours - reference| = {value:.2e}")
    return 0 if all(v < 1e-4 for v in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
