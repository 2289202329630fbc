"""`DiffusionGRPOConfig`: the on-policy options (`on_policy_config.py`) plus what GRPO on a diffusion model needs,
named as in TRL's `GRPOConfig` where the idea is the same (`num_generations`, `beta`, `epsilon`, `num_iterations`,
`scale_rewards`, ...), with each published value and its source (docs/on-policy-math.md, section 4)."""

from dataclasses import dataclass, field
from typing import ClassVar

from .advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS
from .on_policy_config import SyncedReferenceConfig

#: The stochastic sampler steps (sde.py) and each one's published noise level (docs/on-policy-math.md).
DYNAMICS = {"flow_sde": 0.7, "dance": 0.3, "cps": 0.8, "ddim": 1.0}
WINDOW_MODES = ("fixed", "sliding")


@dataclass
class DiffusionGRPOConfig(SyncedReferenceConfig):
    r"""
    Configuration for [`DiffusionGRPOTrainer`]. Every field of `DiffusionDPOConfig` (and so of
    `transformers.TrainingArguments`) is accepted too, with the same meaning, except as `OnPolicyConfig` says
    (prompts per batch, sampling guidance and resolution, the text cache and `max_prompt_length`), and:

    - each prompt gets `num_generations` images, a group, so a group never straddles two processes (advantages are
      still formed over the gathered batch).
    - `beta` is the KL weight (TRL's meaning), not Diffusion-DPO's; `loss_type` and the DPO-only fields do not apply.
    - `guidance_scale` is the classifier-free guidance of the rollout AND of the training forward (the same, or the
      importance ratio would not be 1); the unconditional branch is detached in training, as in flow_grpo.
    - `generation_batch_size` other than None (all images of a micro-step at once, as training forwards them) may
      change the float rounding of the ratio.

    Cost of one micro-step: `per_device_train_batch_size * num_generations` images of `num_inference_steps` denoiser
    calls each (two with guidance) every `num_iterations` optimizer steps, plus per trained step one policy forward
    and backward (and, with `beta > 0`, one reference forward) on those images.
    """

    method_name: ClassVar[str] = "GRPO"

    beta: float | None = field(
        default=0.04,
        metadata={
            "help": "Weight of the KL between the policy's and the reference's step means, "
            "||mu - mu_ref||^2 / (2 s^2) averaged over latent elements (flow_grpo's form, losses.grpo_loss). 0 uses "
            "and loads no reference. Published: 0.04 (Flow-GRPO GenEval and OCR), 0.01 PickScore, 0.02 CLIPScore, 0 "
            "(MixGRPO, Flow-GRPO-Fast); TRL's default is 0.0."
        },
    )
    num_generations: int = field(
        default=8,
        metadata={
            "help": "Images per prompt (the group whose rewards are compared; at least 2). Published: 24 (Flow-GRPO), "
            "12 (DanceGRPO FLUX, MixGRPO), 16 (DanceGRPO SD); TRL's default 8."
        },
    )
    epsilon: float = field(
        default=1e-4,
        metadata={
            "help": "Clip range of the importance ratio. 1e-4 is the published value (Flow-GRPO, DanceGRPO, DDPO) because "
            "the per-step log-density is AVERAGED over latent elements; TRL's 0.2 is for summed token log-probs."
        },
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip range (DAPO's asymmetric clipping); None: equal to `epsilon`."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Divide the advantages by the std of the rewards of the group (TRL's default), of the whole "
            "gathered batch ('batch': Flow-GRPO's published `global_std=True`), or not at all ('none', Dr. GRPO).",
            "choices": list(SCALE_REWARDS),
        },
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "How several rewards make one advantage (TRL): the weighted sum normalised per group, or each "
            "reward normalised in its group, then summed and normalised over the batch (GDPO).",
            "choices": list(MULTI_OBJECTIVE_AGGREGATIONS),
        },
    )
    advantage_clip: float | None = field(
        default=5.0,
        metadata={"help": "Clamp advantages to [-c, c]; published 5 (flow_grpo `adv_clip_max`, DanceGRPO, DDPO)."},
    )
    dynamics: str | None = field(
        default=None,
        metadata={
            "help": "The stochastic sampler step whose log-density the ratio uses: 'flow_sde' (Flow-GRPO), 'dance' "
            "(DanceGRPO, constant noise), 'cps' (Coefficients-Preserving Sampling, arXiv 2509.05952) for the flow "
            "families; 'ddim' (DDIM with eta, DDPO / DanceGRPO's SD path) for SD. None: 'flow_sde' for flow models, "
            "'ddim' for SD.",
            "choices": list(DYNAMICS),
        },
    )
    noise_level: float | None = field(
        default=None,
        metadata={
            "help": "The step's noise: a of the Flow-SDE (published 0.7), eta of DanceGRPO (0.3) and of DDIM (1.0), "
            "CPS's angle (0.8). None: that published value. 0 samples deterministically (nothing to train)."
        },
    )
    num_inference_steps: int = field(
        default=10,
        metadata={"help": "Sampling steps of a training rollout. Published: 10 (Flow-GRPO), 16 (DanceGRPO FLUX), 25 "
                  "(MixGRPO), 50 (DDPO, DanceGRPO SD)."},
    )
    eval_num_inference_steps: int = field(
        default=40,
        metadata={"help": "Sampling steps at evaluation (deterministic sampler); published 40 (Flow-GRPO)."},
    )
    guidance_scale: float = field(
        default=4.5,
        metadata={
            "help": "Classifier-free guidance in rollout and training (the same); 1.0: none (Flow-GRPO-Fast, "
            "DanceGRPO FLUX). Published: 4.5 (Flow-GRPO), 5.0 (DDPO, DanceGRPO SD)."
        },
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata={
            "help": "Without a window: the first int(num_inference_steps * timestep_fraction) stochastic steps are "
            "trained (flow_grpo's rule; 0.99 of 10 is 9, the sharp last step is never trained). Published: 0.99 "
            "(Flow-GRPO), 1.0 (DDPO)."
        },
    )
    sde_window_size: int = field(
        default=0,
        metadata={
            "help": "MixGRPO / Flow-GRPO-Fast: only this many consecutive steps are stochastic and trained, the others "
            "deterministic (cheaper: fewer trained steps). 0: no window. Published: 4 (MixGRPO), 2-3 (flow_grpo)."
        },
    )
    sde_window_mode: str = field(
        default="fixed",
        metadata={
            "help": "'fixed': the window starts at `sde_window_start`; 'sliding' (MixGRPO's progressive strategy): it "
            "moves by `sde_window_stride` steps every `sde_window_shift_every` optimizer steps and rolls back to the "
            "start after the last possible place.",
            "choices": list(WINDOW_MODES),
        },
    )
    sde_window_start: int = field(default=0, metadata={"help": "First stochastic step of the window (0-based)."})
    sde_window_stride: int = field(default=1, metadata={"help": "Steps a sliding window moves (MixGRPO: 1)."})
    sde_window_shift_every: int = field(
        default=25, metadata={"help": "Optimizer steps between two moves of a sliding window (MixGRPO: 25)."})
    init_same_noise: bool = field(
        default=False,
        metadata={
            "help": "All `num_generations` images of a prompt start from the same initial noise (one seed per group, "
            "from the group's place in the global batch), so a group's reward spread comes from the stochastic, "
            "trained steps only. DanceGRPO and MixGRPO's `--init_same_noise` (off by default, on in their FLUX "
            "scripts); Flow-GRPO draws each image's own noise (our default). Needs noise_level > 0."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: a group needs at least 2 images to have a "
                             "reward spread (GRPO's advantage is relative to the group).")
        for name in ("eval_num_inference_steps", "sde_window_stride", "sde_window_shift_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.beta is None or self.beta < 0:
            raise ValueError(f"beta (the KL weight) must be >= 0, got {self.beta}.")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError(f"epsilon / epsilon_high must be > 0, got {self.epsilon} / {self.epsilon_high}.")
        if self.dynamics is not None and self.dynamics not in DYNAMICS:
            raise ValueError(f"dynamics={self.dynamics!r}: expected one of {tuple(DYNAMICS)} or None.")
        if self.noise_level is not None and self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: expected one of {SCALE_REWARDS}.")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}: expected one of "
                             f"{MULTI_OBJECTIVE_AGGREGATIONS}.")
        if self.advantage_clip is not None and self.advantage_clip <= 0:
            raise ValueError(f"advantage_clip must be > 0 or None, got {self.advantage_clip}.")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}.")
        if self.sde_window_mode not in WINDOW_MODES:
            raise ValueError(f"sde_window_mode={self.sde_window_mode!r}: expected one of {WINDOW_MODES}.")
        if self.sde_window_size < 0 or self.sde_window_start < 0:
            raise ValueError("sde_window_size and sde_window_start must be >= 0.")
        if self.sde_window_size and self.sde_window_start + self.sde_window_size > self.num_inference_steps:
            raise ValueError(f"sde_window_size={self.sde_window_size} from sde_window_start={self.sde_window_start} "
                             f"is larger than the num_inference_steps={self.num_inference_steps} sampling steps.")
        if self.init_same_noise and self.noise_level == 0:
            raise ValueError("init_same_noise=True with noise_level=0: every step would be deterministic, so the "
                             "images of a group, started from one noise, would be identical (no reward spread, "
                             "nothing to train). Set noise_level > 0 (or None: the dynamics' published value).")
        if self.sync_ref_model and self.beta == 0:
            raise ValueError("sync_ref_model=True with beta=0: there is no reference to sync (set beta > 0).")
