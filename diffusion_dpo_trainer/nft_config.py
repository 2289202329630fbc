"""`DiffusionNFTConfig`: the on-policy options (`on_policy_config.py`) plus DiffusionNFT's knobs (Zheng et al., arXiv
2509.16117; code NVlabs/DiffusionNFT at 24af555), named as TRL's `GRPOConfig` names them where they mean the same.
Every published value below is from that code's `config/base.py` / `config/nft.py` (docs/on-policy-math.md
section 4)."""

from dataclasses import dataclass, field
from typing import ClassVar

from .advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS
from .old_policy import NFT_DECAY_PRESETS
from .on_policy_config import OnPolicyConfig

NFT_TIMESTEPS = ("schedule", "training")


@dataclass
class DiffusionNFTConfig(OnPolicyConfig):
    r"""
    Configuration for [`DiffusionNFTTrainer`]. Every field of `DiffusionDPOConfig` (and so of
    `transformers.TrainingArguments`) is accepted too, with the same meaning, except as `OnPolicyConfig` says
    (prompts per batch, sampling guidance and resolution, the text cache), and:

    - each prompt gets `num_generations` images, and its group's rewards give each image's advantage.
    - `num_iterations`: the old policy moves once per rollout, after its last optimizer step (the paper's epoch).
    - `beta` is TRL's: the weight of the KL-like regulariser to the base model (adapter off), DiffusionNFT's
      `train.beta` (published 1e-4). The paper's guidance strength is `nft_beta`.
    - `loss_type`, `label_smoothing` and the other preference-loss options do not apply.

    Cost of one micro-step: `per_device_train_batch_size * num_generations` images of `num_inference_steps` denoiser
    calls (no guidance by default) every `num_iterations` optimizer steps, plus, per image and trained timestep, three
    denoiser forwards (policy, old policy, base) and one backward. The text encoders run once per rollout, for its
    prompts; training and the steps that reuse the rollout read that conditioning from the batch.
    """

    method_name: ClassVar[str] = "DiffusionNFT"

    beta: float = field(
        default=1e-4,
        metadata={"help": "Weight of the KL-like regulariser: the mean squared gap between the policy's and the base "
                  "model's (adapter off) predictions. DiffusionNFT's `train.beta`, published 1e-4 (config/base.py) "
                  "for velocity predictions. 0 skips the base model's forward."},
    )
    nft_beta: float = field(
        default=1.0,
        metadata={"help": "The paper's guidance strength beta: the implicit policies are v+ = b v + (1 - b) v_old and "
                  "v- = (1 + b) v_old - b v. Published 1.0; 0.1 for the OCR recipe (config/nft.py `beta`)."},
    )
    num_generations: int = field(
        default=4,
        metadata={"help": "Images sampled per prompt: the group whose rewards are normalised into advantages (at "
                  "least 2). Published 24 (config/nft.py `num_image_per_prompt`)."},
    )
    num_inference_steps: int = field(
        default=10,
        metadata={"help": "Denoising steps per sampled image, with the pipeline's own deterministic scheduler. "
                  "Published 10 for training, 40 for evaluation (config/nft.py)."},
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={"help": "The pipeline's `guidance_scale` while sampling. 1.0 (the default, published): no "
                  "classifier-free guidance; DiffusionNFT trains CFG-free. Training always uses the conditional "
                  "prediction alone."},
    )
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "Advantage normalisation (TRL's `scale_rewards`): the group mean is subtracted, then divided "
                  "by the group's std (`group`), the whole batch's std (`batch`) or nothing (`none`). DiffusionNFT "
                  "divides by the batch's std (`global_std=True`), hence the default `batch`; TRL's is `group`.",
                  "choices": list(SCALE_REWARDS)},
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "How several rewards combine (TRL's option): `sum_then_normalize` or `normalize_then_sum`.",
                  "choices": list(MULTI_OBJECTIVE_AGGREGATIONS)},
    )
    advantage_clip: float = field(
        default=5.0,
        metadata={"help": "c: advantages are clipped to [-c, c] and mapped to the optimality weight r = 0.5 + A / "
                  "(2c); the loss is also scaled by c, as the official code does (`adv_clip_max`, published 5)."},
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata={"help": "Share of the sampling schedule's timesteps each image is trained on, per rollout use: "
                  "int(num_inference_steps * timestep_fraction) of them (at least 1), in a per-image random order, "
                  "each with fresh forward noise, all in one optimizer step. Published 0.99 (9 of 10)."},
    )
    nft_timesteps: str = field(
        default="schedule",
        metadata={"help": "Where the training timesteps come from: `schedule` (the paper: the rollout scheduler's "
                  "timesteps, snapped to the model's training schedule) or `training` (the family's own training "
                  "distribution, e.g. `weighting_scheme` for flows; `timestep_fraction` then sets how many draws).",
                  "choices": list(NFT_TIMESTEPS)},
    )
    ema_decay_type: int = field(
        default=1,
        metadata={"help": "The old policy's EMA schedule preset (the official `decay_type`): 0 a copy of the policy "
                  "every rollout, 1 (published default) decay min(0.001 * step, 0.5), 2 (OCR recipe) 0 for 75 steps "
                  "then min(0.0075 * (step - 75), 0.999). `ema_flat` / `ema_uprate` / `ema_uphold` override it.",
                  "choices": sorted(NFT_DECAY_PRESETS)},
    )
    ema_flat: int | None = field(
        default=None, metadata={"help": "Optimizer steps with decay 0 before the decay grows (None: the preset's)."})
    ema_uprate: float | None = field(
        default=None, metadata={"help": "Growth of the decay per optimizer step (None: the preset's)."})
    ema_uphold: float | None = field(
        default=None, metadata={"help": "Largest decay, in [0, 1) (None: the preset's)."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (a group needs a spread), got {self.num_generations}.")
        if not self.nft_beta > 0:
            raise ValueError(f"nft_beta must be positive (the loss divides by it), got {self.nft_beta}.")
        if self.beta is None or self.beta < 0:
            raise ValueError(f"beta (the regulariser weight) must be >= 0, got {self.beta}.")
        if not self.advantage_clip > 0:
            raise ValueError(f"advantage_clip must be positive, got {self.advantage_clip}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: expected one of {SCALE_REWARDS}.")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}: expected one of "
                             f"{MULTI_OBJECTIVE_AGGREGATIONS}.")
        if self.nft_timesteps not in NFT_TIMESTEPS:
            raise ValueError(f"nft_timesteps={self.nft_timesteps!r}: expected one of {NFT_TIMESTEPS}.")
        if self.ema_decay_type not in NFT_DECAY_PRESETS:
            raise ValueError(f"ema_decay_type={self.ema_decay_type}: expected one of {sorted(NFT_DECAY_PRESETS)}.")
        if self.ema_uphold is not None and not 0 <= self.ema_uphold < 1:
            raise ValueError(f"ema_uphold must be in [0, 1), got {self.ema_uphold}.")
        if self.precompute_ref_errors:
            raise ValueError("precompute_ref_errors does not apply to DiffusionNFT: its latents are sampled, not "
                             "encoded.")

    @property
    def ema_schedule(self) -> tuple[int, float, float]:
        """(flat, uprate, uphold) of the old policy's decay: the preset, with any explicit override."""
        flat, uprate, uphold = NFT_DECAY_PRESETS[self.ema_decay_type]
        return (flat if self.ema_flat is None else self.ema_flat, uprate if self.ema_uprate is None else
                self.ema_uprate, uphold if self.ema_uphold is None else self.ema_uphold)

    @property
    def num_train_timesteps(self) -> int:
        """Timesteps trained per image and rollout use."""
        return max(int(self.num_inference_steps * self.timestep_fraction), 1)
