"""HPSv3 (Ma et al. 2025, arXiv 2508.03789, github.com/MizzenAI/HPSv3) on transformers' Qwen2-VL.

Read from the `hpsv3` 1.0.0 package (its `inference.py`, `train.py`, `model/qwen2vl_trainer.py`,
`dataset/data_collator_qwen.py`, `config/HPSv3_7B.yaml`), which pins transformers 4.45 and DeepSpeed and so is not a
dependency here:

- the model is `Qwen/Qwen2-VL-7B-Instruct` with one added special token, `<|Reward|>` (the input embeddings resized to
  the tokenizer's new length), and a "ranknet" head on the last hidden state at that token:
  `Linear(3584, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)`, run in float32;
- the head predicts a mean and a spread (the uncertainty-aware ranking loss); the score is the MEAN (output 0);
- the checkpoint `HPSv3.safetensors` (Hub `MizzenAI/HPSv3`) is the whole model's state dict in transformers 4.45
  names (`visual.*`, `model.*`, `lm_head.*`, `rm_head.{0,3,5}.*`); `hpsv3_to_transformers` renames it to
  transformers 5's (`model.visual.*`, `model.language_model.*`) and drops the unused `lm_head`;
- the prompt: one user turn with the image, then `INSTRUCTION` (the rating instruction with the prompt) and
  `REWARD_PROMPT` (ending with the `<|Reward|>` token), through Qwen2-VL-Instruct's chat template, the assistant's
  turn opened;
- the image: resized (PIL bicubic) to `smart_resize(h, w, 28, min_pixels=max_pixels=256 * 28 * 28)`, i.e. about
  448 x 448 at the image's aspect ratio (256 merged patches), then Qwen2-VL's image processor (rescale 1/255, OpenAI
  CLIP mean/std, 14 px patches, 2 x 2 merge).

The score is unbounded (a ranking model): the README's benchmark means run from -0.24 (SD2) through 8.20 (SDXL) to
10.55 (Kolors).
"""

import math

import torch
from accelerate import init_empty_weights
from PIL import Image
from torch import nn
from transformers import AutoConfig, Qwen2VLModel

from .base import ModelReward, checkpoint_file
from .vlm import chat_text, check_finite, load_chat_tokenizer, load_image_processor, vlm_inputs

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_FACTOR = 28  # patch 14 x merge 2
IMAGE_PIXELS = 256 * 28 * 28  # the data config's min_pixels and max_pixels: every image gets 256 merged patches
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291 (the reference's trailing spaces are part of the prompt)
REWARD_PROMPT = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = IMAGE_PIXELS,
                 max_pixels: int = IMAGE_PIXELS) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize` (as vendored by hpsv3): sides that are multiples of `factor`, the aspect ratio
    kept, the area brought into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"An image of {width}x{height} is too elongated for Qwen2-VL (aspect ratio over 200).")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_for_hpsv3(image: Image.Image) -> Image.Image:
    height, width = smart_resize(image.height, image.width)
    return image.convert("RGB").resize((width, height), Image.BICUBIC)


def hpsv3_to_transformers(state: dict) -> dict:
    """The published state dict (transformers 4.45 names) in this module's names; the language-model head is not
    used for scoring and is dropped. Checkpoints already in transformers 5 names pass through."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            key = "model.language_model." + key.removeprefix("model.")
        out[key] = value
    return out


def reward_head(hidden_size: int) -> nn.Sequential:
    """The "ranknet" head (hpsv3's default when `rm_head_kwargs` is unset): index 0, 3 and 5 hold the weights."""
    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


class _HPSv3Model(nn.Module):
    def __init__(self, config, reward_token_id: int):
        super().__init__()
        self.model = Qwen2VLModel(config)
        self.rm_head = reward_head(config.text_config.hidden_size)
        self.reward_token_id = reward_token_id

    def forward(self, input_ids, **inputs) -> torch.Tensor:
        """(mean, spread) per row, from the hidden state at the row's one `<|Reward|>` token."""
        hidden = self.model(input_ids=input_ids, **inputs).last_hidden_state
        at_token = input_ids == self.reward_token_id
        if not bool((at_token.sum(dim=1) == 1).all()):
            raise ValueError(f"Every HPSv3 input needs exactly one {REWARD_TOKEN} token; "
                             f"got {at_token.sum(1).tolist()}.")
        return self.rm_head(hidden[at_token].float())


class HPSv3(ModelReward):
    """HPSv3 score (the predicted mean) of each (image, prompt).

    Args:
        checkpoint: a local `HPSv3.safetensors` (or a `.pth` with the same state dict, optionally under "model"), or a
            Hub repository holding it (default `MizzenAI/HPSv3`).
        base: hub id or local directory of the base model's config, tokenizer (with its chat template) and image
            processor (default `Qwen/Qwen2-VL-7B-Instruct`, as the reference).
        device, dtype, batch_size: where, in which precision (bfloat16 as the reference; the head stays float32) and
            how many images per forward pass.
    """

    def __init__(self, checkpoint: str | None = None, base: str = BASE_MODEL, device=None,
                 dtype=torch.bfloat16, batch_size: int = 8):
        path = checkpoint_file(checkpoint or HPSV3_REPO, HPSV3_FILE)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state)
        state = hpsv3_to_transformers(state)
        self.tokenizer = load_chat_tokenizer(base)
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.image_processor = load_image_processor(base)
        config = AutoConfig.from_pretrained(base)
        embeddings = state.get("model.language_model.embed_tokens.weight")
        if embeddings is None or embeddings.shape[0] != len(self.tokenizer):
            raise ValueError(f"{checkpoint or HPSV3_REPO} is not an HPSv3 checkpoint for {base}: expected input "
                             f"embeddings for the {len(self.tokenizer)} tokens of its tokenizer plus {REWARD_TOKEN}, "
                             f"got {None if embeddings is None else tuple(embeddings.shape)}.")
        config.text_config.vocab_size = len(self.tokenizer)  # the reference's resize_token_embeddings
        with init_empty_weights():
            self.model = _HPSv3Model(config, self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        try:
            self.model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"{checkpoint or HPSV3_REPO} does not fit the Qwen2-VL architecture of {base!r}: "
                             f"{exc}") from exc
        self.model.eval().requires_grad_(False)
        self.model.to(device=device, dtype=dtype)
        self.model.rm_head.float()
        self.batch_size = batch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.dtype

    def preprocess(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        texts = [chat_text(self.tokenizer, INSTRUCTION.format(text_prompt=p) + REWARD_PROMPT) for p in prompts]
        return vlm_inputs(self.tokenizer, self.image_processor, texts, [resize_for_hpsv3(i) for i in images])

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        inputs = self.preprocess(images, prompts)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return check_finite(self.model(**inputs)[:, 0], "HPSv3")
