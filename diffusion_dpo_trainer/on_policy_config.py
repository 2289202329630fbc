"""`OnPolicyConfig`: the options every trainer on the policy's own samples shares (online DPO, GRPO, DiffusionNFT):
how a rollout samples and how often it is reused, how rewards combine, and the reference that follows the policy.
Each method's config subclasses it and sets its own defaults (with their published values) and options."""

from dataclasses import dataclass, field
from typing import ClassVar

from .config import DiffusionDPOConfig


@dataclass
class OnPolicyConfig(DiffusionDPOConfig):
    r"""
    The shared on-policy options, with the meaning they have in every on-policy config. Differences from
    `DiffusionDPOConfig` that hold for all of them:

    - `per_device_train_batch_size` counts PROMPTS per process and micro-step (TRL's convention); each prompt gets
      several images.
    - `guidance_scale` is the guidance the images are sampled with (the pipeline's `guidance_scale`), and
      `resolution` the size they are sampled at.
    - `max_prompt_length` and `precompute_text_embeddings` apply to the rollout and the training step alike (both
      condition on the same embeddings); `precompute_latents` does not apply (the latents are sampled).
    """

    #: The method's name in error messages.
    method_name: ClassVar[str] = "on-policy training"

    num_inference_steps: int = field(
        default=10,
        metadata={"help": "Denoising steps per sampled image (the pipeline's `num_inference_steps`)."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per pipeline call while sampling (a memory knob; results do not depend on it up to "
            "float rounding). None: all images of a micro-step in one call."
        },
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "Optimizer steps trained on each rollout (GRPO's mu, TRL's name): new images are sampled every "
            "`num_iterations` optimizer steps for the prompts of the next step, and each reuse draws fresh noise and "
            "timesteps. 1 is fully on-policy; more trades staleness for less sampling."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward function (TRL's `reward_weights`): the combined reward of an image is "
            "sum_i w_i * r_i over the functions that scored it (None skips a function for that image). None: every "
            "weight is 1.0."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_inference_steps", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1 or None, got {self.generation_batch_size}.")
        if self.precompute_latents:
            raise ValueError(f"precompute_latents does not apply to {self.method_name}: its latents are sampled, not "
                             "encoded.")


@dataclass
class SyncedReferenceConfig(OnPolicyConfig):
    """`OnPolicyConfig` plus a reference that follows the policy (TRL's `sync_ref_model`: online DPO, GRPO)."""

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
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}.")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}.")
