"""What one image costs each reward model: parameters and forward FLOPs of the published architectures (built from
their configurations with random weights: nothing is downloaded), and the OCR reward's measured CPU time.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/reward_cost.py

FLOPs are counted by `torch.utils.flop_counter` (2 per multiply-add) for one image and one prompt; the CLIP models
are split into their image and text towers (the aesthetic predictor runs the image tower alone). docs/rewards.md
quotes the output.
"""

import time

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipTextConfig, BlipVisionConfig, CLIPConfig, CLIPModel

from diffusion_dpo_trainer.rewards import load_reward
from diffusion_dpo_trainer.rewards.imagereward import TEXT_CONFIG, VISION_CONFIG, _ImageReward

CLIP_L14 = CLIPConfig(  # openai/clip-vit-large-patch14: clip, aesthetic
    vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=224, hidden_act="quick_gelu"),
    text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     hidden_act="quick_gelu"), projection_dim=768)
CLIP_H14 = CLIPConfig(  # OpenCLIP ViT-H-14: PickScore, HPSv2/v2.1
    vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     hidden_act="gelu"), projection_dim=1024)


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def clip_costs(name: str, config: CLIPConfig) -> None:
    with torch.device("meta"):
        model = CLIPModel(config)
        pixels, tokens = torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
        image = flops(lambda: model.get_image_features(pixel_values=pixels))
        text = flops(lambda: model.get_text_features(input_ids=tokens))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {params:.0f} M parameters; {image:.0f} GFLOPs per 224 px image, {text:.0f} per 77-token prompt")


def main() -> None:
    clip_costs("CLIP ViT-L/14", CLIP_L14)
    clip_costs("CLIP ViT-H/14", CLIP_H14)
    # on the CPU, not the meta device: the BLIP text model calls .item()
    model = _ImageReward(BlipVisionConfig(**VISION_CONFIG), BlipTextConfig(**TEXT_CONFIG)).eval()
    cost = flops(lambda: model(torch.zeros(1, 35, dtype=torch.long), torch.ones(1, 35, dtype=torch.long),
                               torch.zeros(1, 3, 224, 224)))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"ImageReward (BLIP ViT-L/16 + BERT-base): {params:.0f} M parameters; {cost:.0f} GFLOPs per 224 px image and "
          "35-token prompt")

    reward = load_reward("ocr", num_threads=1)
    image = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(image).text((40, 200), "Hello World", fill="black", font=ImageFont.load_default(size=56))
    reward([image], ['"Hello World"'])  # warm-up
    start = time.perf_counter()
    scores = reward([image] * 8, ['a sign that reads "Hello World"'] * 8)
    print(f"OCR (PP-OCRv4, onnxruntime): {(time.perf_counter() - start) / 8 * 1000:.0f} ms per 512 px image on one CPU "
          f"thread (scores {sorted(set(scores))})")


if __name__ == "__main__":
    main()
