"""What the Qwen-VL reward models (HPSv3, UnifiedReward) share: one chat turn with an image, as model inputs.

transformers' `Qwen2VLProcessor` / `Qwen3VLProcessor` also hold a video processor, and that one imports torchvision
(whose build must match torch's, so the library does not install it). An image reward needs only the image half of
the processor, which is done here with the checkpoint's own tokenizer (and its chat template) and image processor
(`AutoImageProcessor`: the published `preprocessor_config.json`; without torchvision transformers picks its PIL
implementation): the image is resized, normalised and cut into patches, each `<|image_pad|>` of the chat text becomes
`t * h * w / merge_size**2` copies (one per merged patch), and `mm_token_type_ids` marks them (1) for the model's
multimodal rotary positions, exactly as the processor does.
"""

import json

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.utils import cached_file

IMAGE_TOKEN = "<|image_pad|>"


def load_chat_tokenizer(path: str, **kwargs):
    """The tokenizer of a Qwen-VL checkpoint with its chat template (from the tokenizer files, else from the
    processor's `chat_template.jinja` / `chat_template.json`)."""
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.chat_template is None:
        for filename in ("chat_template.jinja", "chat_template.json"):
            file = cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
            if file:
                with open(file, encoding="utf-8") as handle:
                    text = handle.read()
                tokenizer.chat_template = json.loads(text)["chat_template"] if filename.endswith("json") else text
                break
        else:
            raise ValueError(f"{path} has no chat template (tokenizer_config.json, chat_template.jinja or "
                             "chat_template.json); expected a Qwen-VL checkpoint.")
    return tokenizer


def load_image_processor(path: str, **kwargs):
    return AutoImageProcessor.from_pretrained(path, **kwargs)


def chat_text(tokenizer, text: str) -> str:
    """One user turn holding an image then `text`, rendered by the checkpoint's chat template with the assistant's
    turn opened (as `apply_chat_template(..., add_generation_prompt=True)` in the reference code)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def vlm_inputs(tokenizer, image_processor, texts: list[str], images: list[Image.Image],
               padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Model inputs of chat `texts` (one `<|image_pad|>` each) and their `images`, padded on `padding_side`."""
    vision = image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    merge = image_processor.merge_size ** 2
    expanded = []
    for i, (text, grid) in enumerate(zip(texts, vision["image_grid_thw"], strict=True)):
        if text.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"texts[{i}]: expected one {IMAGE_TOKEN} (the chat template's image), "
                             f"found {text.count(IMAGE_TOKEN)}.")
        expanded.append(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * int(grid.prod() // merge)))
    text_inputs = tokenizer(expanded, padding=True, padding_side=padding_side, return_tensors="pt")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return {
        "input_ids": text_inputs["input_ids"],
        "attention_mask": text_inputs["attention_mask"],
        "mm_token_type_ids": (text_inputs["input_ids"] == image_token_id).int(),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def check_finite(scores: torch.Tensor, reward: str) -> torch.Tensor:
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"The {reward} reward is not finite for images {bad} of the batch ({scores[bad].tolist()}); "
                         "check the checkpoint and the dtype (float16 overflows).")
    return scores
