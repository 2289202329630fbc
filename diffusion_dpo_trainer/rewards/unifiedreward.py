"""UnifiedReward-2.0 (Wang et al. 2025, arXiv 2503.05236, github.com/CodeGoat24/UnifiedReward): a vision-language
judge that WRITES its scores, on transformers' Qwen2.5-VL / Qwen3-VL (`AutoModelForImageTextToText`).

The checkpoints are ordinary transformers repositories: `CodeGoat24/UnifiedReward-2.0-qwen-{3b,7b,32b,72b}`
(Qwen2.5-VL-Instruct) and `CodeGoat24/UnifiedReward-2.0-qwen3vl-{2b,4b,8b,32b}` (Qwen3-VL). Each image is judged in
one user turn (the image, then the prompt text), the answer generated greedily and parsed:

- `template="acs"` (default; UnifiedReward-2.0's point score, `inference_qwen/UnifiedReward-2.0-inference/
  point_score_ACS_image_generation.py`): the judge writes `Alignment Score (1-5): x`, `Coherence Score (1-5): y`,
  `Style Score (1-5): z` (decimals, e.g. 2.6947); the reward is their mean, on the judge's 1-5 scale
  (verl-omni rescales the same mean to [0, 1] with (s - 1) / 4: an affine map, same ranking);
- `template="final"` (the classic `qwen_point_score_image_generation.py` prompt): the judge lists the caption's
  elements and writes `Final Score: x` (1-5); the reward is x.

An answer without the expected scores raises `UnparseableAnswerError` (naming the image and quoting the answer), or
scores None with `on_unparseable="none"`: TRL's convention for "this completion is not scored", which its trainers
skip (and which a combined reward must then handle). Images go to the checkpoint's own image processor (its
`preprocessor_config.json` min/max pixels, as the vLLM server the authors recommend does).
"""

import math
import re

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from .base import ModelReward, check_inputs
from .vlm import chat_text, load_chat_tokenizer, load_image_processor, vlm_inputs

DEFAULT_MODEL = "CodeGoat24/UnifiedReward-2.0-qwen-7b"
ACS_TEMPLATE = (
    "You are presented with a generated image and its associated text caption. "
    "Your task is to analyze the image across multiple dimensions in relation to the caption. Specifically:\n"
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
FINAL_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text "
    "caption, evaluate their presence in the generated image using the format: 'element (type): value' (where "
    "value=0 means not generated, and value=1 means generated), and assign a score from 1 to 5 after 'Final "
    "Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
TEMPLATES = {"acs": ACS_TEMPLATE, "final": FINAL_TEMPLATE}
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
ACS_AXES = ("alignment", "coherence", "style")
_ACS = re.compile(r"(Alignment|Coherence|Style)\s+Score\s*(?:\(1-5\))?\s*:\s*\**\s*" + _NUMBER, re.IGNORECASE)
_FINAL = re.compile(r"Final\s+Score\s*:\s*\**\s*" + _NUMBER, re.IGNORECASE)


class UnparseableAnswerError(ValueError):
    """The judge's answer does not hold the scores its template asks for."""


def parse_answer(answer: str, template: str = "acs") -> float | None:
    """The score in a judge's answer, or None when it holds none: the mean of the three axes ("acs", each axis
    must appear; the last value of an axis counts) or the last `Final Score:` value ("final")."""
    if template == "acs":
        axes = {name.lower(): float(value) for name, value in _ACS.findall(answer)}
        return sum(axes[a] for a in ACS_AXES) / len(ACS_AXES) if set(ACS_AXES) <= set(axes) else None
    if template == "final":
        values = _FINAL.findall(answer)
        return float(values[-1]) if values else None
    raise ValueError(f"Unknown UnifiedReward template {template!r}; expected one of {sorted(TEMPLATES)}.")


class UnifiedReward(ModelReward):
    """UnifiedReward-2.0 point score of each (image, prompt), on the judge's 1-5 scale.

    Args:
        model: hub id or local directory of a UnifiedReward-2.0 checkpoint (default
            `CodeGoat24/UnifiedReward-2.0-qwen-7b`; the Qwen3-VL ones load the same way).
        template: "acs" (alignment, coherence and style, averaged) or "final" (the classic "Final Score").
        on_unparseable: "raise" (`UnparseableAnswerError`) or "none" (that image scores None).
        max_new_tokens: the answer's budget ("final" answers list the caption's elements first: keep it generous).
        device, dtype, batch_size: where, in which precision (default bfloat16) and how many images per generate call.
    """

    def __init__(self, model: str = DEFAULT_MODEL, template: str = "acs", on_unparseable: str = "raise",
                 max_new_tokens: int = 512, device=None, dtype=torch.bfloat16, batch_size: int = 8):
        if template not in TEMPLATES:
            raise ValueError(f"Unknown UnifiedReward template {template!r}; expected one of {sorted(TEMPLATES)}.")
        if on_unparseable not in ("raise", "none"):
            raise ValueError(f"on_unparseable must be 'raise' or 'none', got {on_unparseable!r}.")
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
        self._place(device, dtype)
        self.tokenizer = load_chat_tokenizer(model)
        self.image_processor = load_image_processor(model)
        self.name, self.template, self.on_unparseable = model, template, on_unparseable
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def answers(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """The judge's answers (greedy), one per image."""
        texts = [chat_text(self.tokenizer, TEMPLATES[self.template].format(prompt=p)) for p in prompts]
        inputs = vlm_inputs(self.tokenizer, self.image_processor, texts, images, padding_side="left")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def _parse(self, images: list[Image.Image], prompts: list[str], offset: int) -> list[float | None]:
        scores = []
        for i, answer in enumerate(self.answers(images, prompts)):
            score = parse_answer(answer, self.template)
            if score is None and self.on_unparseable == "raise":
                raise UnparseableAnswerError(
                    f"images[{offset + i}]: {self.name} answered {answer[:300]!r}, which has no "
                    f"{'Alignment/Coherence/Style scores' if self.template == 'acs' else 'Final Score'}; pass "
                    "on_unparseable='none' to leave such images unscored (None).")
            scores.append(score)
        return scores

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """The batch's scores, NaN where an answer holds none (with on_unparseable="none")."""
        return torch.tensor([math.nan if s is None else s for s in self._parse(images, prompts, 0)],
                            dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float | None]:
        check_inputs(images, prompts)
        return [score for start in range(0, len(images), self.batch_size)
                for score in self._parse(list(images[start : start + self.batch_size]),
                                         list(prompts[start : start + self.batch_size]), start)]
