"""`DiffusionOnlineDPOConfig`: `DiffusionDPOConfig` plus what on-policy training needs (sampling, pairing, reference
sync), named as in TRL's `OnlineDPOConfig` / `GRPOConfig` where they have the same meaning."""

from dataclasses import dataclass, field

from .config import DiffusionDPOConfig

PAIR_STRATEGIES = ("best_vs_worst", "all_pairs")


@dataclass
class DiffusionOnlineDPOConfig(DiffusionDPOConfig):
    r"""
    Configuration for [`DiffusionOnlineDPOTrainer`]. Every field of `DiffusionDPOConfig` (and so of
    `transformers.TrainingArguments`) is accepted too, with the same meaning, except:

    - `per_device_train_batch_size` counts PROMPTS per process and micro-step (TRL's convention): each prompt gets
      `num_images_per_prompt` images and, with `pair_strategy="best_vs_worst"`, at most one pair.
    - `guidance_scale` is also the guidance the images are sampled with (the pipeline's `guidance_scale`).
    - `resolution` is also the size the images are sampled at.
    - `precompute_latents` does not apply (the latents are sampled); `precompute_text_embeddings` does.

    Cost of one micro-step: `per_device_train_batch_size * num_images_per_prompt` images of `num_inference_steps`
    denoiser calls each (times two with classifier-free guidance) every `num_iterations` optimizer steps, plus the
    offline step (one policy and one reference forward on the pairs).
    """

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
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per pipeline call while sampling (a memory knob; results do not depend on it up to "
            "float rounding). None: all images of a micro-step in one call."
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
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "Optimizer steps trained on each generated batch (GRPO's mu): new images are sampled every "
            "`num_iterations` optimizer steps for the prompts of the next step, and each reuse draws fresh noise and "
            "timesteps. 1 is fully on-policy; more trades staleness for less sampling."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward function: the combined reward of an image is sum_i w_i * r_i over the "
            "functions that scored it (None skips a function for that image; an image no function scored is never "
            "paired). None: every weight is 1.0."
        },
    )
    no_pair_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop with an error after this many consecutive optimizer steps in which no prompt on any process "
            "formed a pair (all images tied, missed `min_score_gap` or were unscored: such a step changes nothing). "
            "The first such step always warns. None: never stop."
        },
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Move the reference towards the policy every `ref_model_sync_steps` optimizer steps (TR-DPO, "
            "TRL's option; Flow-GRPO's online DPO refreshes its reference the same way): ref = alpha * policy + "
            "(1 - alpha) * ref, parameter by parameter. With LoRA the reference is a second adapter ('ref') on the "
            "same denoiser, so the mix applies to the adapter's parameters; with a full fine-tune, to the frozen copy."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "alpha of `sync_ref_model` in (0, 1]: 1.0 copies the policy into the reference."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "Optimizer steps between two reference syncs (`sync_ref_model=True` only)."},
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
        for name in ("num_inference_steps", "num_iterations", "ref_model_sync_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.no_pair_patience is not None and self.no_pair_patience < 1:
            raise ValueError(f"no_pair_patience must be >= 1 or None, got {self.no_pair_patience}.")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1 or None, got {self.generation_batch_size}.")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}.")
        if self.precompute_latents:
            raise ValueError("precompute_latents does not apply to online DPO: its latents are sampled, not encoded.")
