"""`DiffusionOnlineDPOConfig`: the on-policy options (`on_policy_config.py`: sampling, reuse, reward weights, reference
sync) plus pairing, named as in TRL's `OnlineDPOConfig` / `GRPOConfig` where they have the same meaning."""

from dataclasses import dataclass, field
from typing import ClassVar

from .on_policy_config import SyncedReferenceConfig

PAIR_STRATEGIES = ("best_vs_worst", "all_pairs")


@dataclass
class DiffusionOnlineDPOConfig(SyncedReferenceConfig):
    r"""
    Configuration for [`DiffusionOnlineDPOTrainer`]. Every field of `DiffusionDPOConfig` (and so of
    `transformers.TrainingArguments`) is accepted too, with the same meaning, except as `OnPolicyConfig` says
    (prompts per batch, sampling guidance and resolution, the text cache); each prompt gets `num_images_per_prompt`
    images and, with `pair_strategy="best_vs_worst"`, at most one pair. An image no reward function scored is never
    paired.

    Cost of one micro-step: `per_device_train_batch_size * num_images_per_prompt` images of `num_inference_steps`
    denoiser calls each (times two with classifier-free guidance) every `num_iterations` optimizer steps, plus the
    offline step (one policy and one reference forward on the pairs).
    """

    method_name: ClassVar[str] = "online DPO"

    num_images_per_prompt: int = field(
        default=4,
        metadata={"help": "Images sampled per prompt from the current policy (at least 2; even with a `judge`)."},
    )
    num_inference_steps: int = field(
        default=20,
        metadata={"help": "Denoising steps per sampled image (the pipeline's `num_inference_steps`)."},
    )
    guidance_scale: float = field(
        default=3.5,
        metadata={
            "help": "The pipeline's `guidance_scale` when sampling (classifier-free guidance for SD/SDXL/SD3, the "
            "guidance input of guidance-distilled FLUX.1-dev, which training then feeds too). 1.0 switches "
            "classifier-free guidance off."
        },
    )
    pair_strategy: str = field(
        default="best_vs_worst",
        metadata={
            "help": "How a prompt's scored images become pairs: `best_vs_worst` (the highest against the lowest "
            "score, at most one pair per prompt) or `all_pairs` (every two images, winner by score). A pair is kept "
            "only if its score gap exceeds `min_score_gap`; equal scores never make a pair. With a `judge`, images "
            "(0, 1), (2, 3), ... of a prompt are judged as pairs.",
            "choices": list(PAIR_STRATEGIES),
        },
    )
    min_score_gap: float = field(
        default=0.0,
        metadata={"help": "Smallest combined-reward gap (exclusive) between chosen and rejected for a pair to count."},
    )
    no_pair_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop with an error after this many consecutive optimizer steps in which no prompt on any process "
            "formed a pair (all images tied, missed `min_score_gap` or were unscored: such a step changes nothing). "
            "The first such step always warns. None: never stop."
        },
    )
    def __post_init__(self):
        super().__post_init__()
        if self.num_images_per_prompt < 2:
            raise ValueError(
                f"num_images_per_prompt must be at least 2 to make a pair, got {self.num_images_per_prompt}."
            )
        if self.pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"Unknown pair_strategy {self.pair_strategy!r}; expected one of {PAIR_STRATEGIES}.")
        if self.min_score_gap < 0:
            raise ValueError(f"min_score_gap must be >= 0 (a tie is not a preference), got {self.min_score_gap}.")
        if self.no_pair_patience is not None and self.no_pair_patience < 1:
            raise ValueError(f"no_pair_patience must be >= 1 or None, got {self.no_pair_patience}.")
