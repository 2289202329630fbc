"""`DiffusionDPOConfig`: TrainingArguments plus what Diffusion-DPO needs, with diffusion-friendly defaults."""

import dataclasses
import numbers
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainingArguments


@dataclass
class DiffusionDPOConfig(TrainingArguments):
    r"""
    Configuration for [`DiffusionDPOTrainer`]. Every field of `transformers.TrainingArguments` is accepted too.

    beta convention: the loss is `-logsigmoid(-beta/2 * ((m_w - r_w) - (m_l - r_l)))` where `m`/`r` are the policy and
    reference denoising errors averaged over latent elements (mean reduction). With this convention the published
    default for SD1.5 and SDXL is `beta=5000`. An implementation that sums over latent elements instead needs a beta
    smaller by the number of latent elements; one without the `1/2` needs half of it. `beta=None` (the default) takes
    the model family's `default_beta`, listed per family in docs/models.md: flow-matching families take a smaller one,
    since their velocity errors are larger than epsilon errors (see docs/flow-models.md).

    Defaults that differ from `TrainingArguments`: `remove_unused_columns=False` (the collator needs the image
    columns), `label_names=[]` (there are no labels), `logging_steps=10`, and unless set,
    `accelerator_config.dispatch_batches=False` (batches hold prompt strings, which accelerate cannot concatenate to
    dispatch a streamed dataset's batches from one process; each process reads the stream and keeps its share), and
    `dataloader_pin_memory=False` when there is no accelerator (or `use_cpu`), where pinning does nothing but warn.
    `activation_checkpointing` (alias `gradient_checkpointing`) switches on the denoiser's own diffusers
    checkpointing.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "ref_model_init_kwargs"]

    beta: float | None = field(
        default=None,
        metadata={
            "help": "Strength of the KL regularisation towards the reference model, in the reference code's "
            "convention (per-sample mse averaged over latent elements, factor -beta/2). Larger beta keeps the model "
            "closer to the reference. None uses the model family's default, listed per family in docs/models.md: 5000 "
            "(the published value) for SD1.x/2.x and SDXL, smaller for flow-matching models (their errors are "
            "larger)."
        },
    )
    loss_type: str | list[str] = field(
        default="sigmoid",
        metadata={
            "help": "Preference loss, or a list of them summed with `loss_weights`: `sigmoid` (Diffusion-DPO), "
            "`hinge` (SLiC), `ipo`, `sft` (denoising loss on the preferred image), `mapo` (reference-free) on paired "
            "data; `kto` on unpaired data (prompt, image, label). See docs/losses.md."
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per entry of `loss_type` when it is a list, e.g. `loss_type=['sigmoid', 'sft']` with "
            "`loss_weights=[1.0, 0.2]`. Defaults to 1.0 for each."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Conservative DPO for `sigmoid`: the probability eps in [0, 0.5] that a preference label is "
            "wrong; the loss becomes -(1-eps)*logsigmoid(z) - eps*logsigmoid(-z). 0 is plain Diffusion-DPO."
        },
    )
    mapo_beta: float = field(
        default=0.1,
        metadata={"help": "MaPO: weight of the margin term against the preferred image's denoising loss."},
    )
    mapo_gamma: float = field(
        default=0.5,
        metadata={"help": "MaPO: gamma in its log-odds stand-in s(m) = gamma*m / (exp(gamma*m) - 1)."},
    )
    mapo_temperature: float = field(
        default=1000.0,
        metadata={"help": "MaPO: T, the factor on the margin inside the logsigmoid (the number of train timesteps)."},
    )
    kto_desirable_weight: float = field(
        default=1.0,
        metadata={"help": "KTO: lambda_D, the weight of the loss on desirable images (label True)."},
    )
    kto_undesirable_weight: float = field(
        default=1.0,
        metadata={"help": "KTO: lambda_U, the weight of the loss on undesirable images (label False)."},
    )
    # Stabilisers of offline preference training (docs/losses.md, "Stabilisers"): each off at its default and
    # combinable with every paired loss.
    winner_preserving_mu: float | None = field(
        default=None,
        metadata={
            "help": "Diffusion-SDPO's winner-preserving safeguard (arXiv 2511.03317): scale the gradient through the "
            "rejected images' errors by lambda = clamp((1 - mu) * |g_w|^2 / (g_l . g_w), 0, 1) (1 when g_l . g_w <= 0), "
            "from the output-space gradients of the batch's winner and loser errors, so the preferred images' error "
            "does not rise to first order. mu in [0, 1]; larger is more conservative. The reference scripts use 0.9 "
            "for SD1.5 and 0.6 for SDXL with Diffusion-DPO. None (default) is off. Logged as `winner_preserving/lambda`."
        },
    )
    soft_labels: str = field(
        default="none",
        metadata={
            "help": "Per-pair soft preference labels p (the probability that `chosen` is preferred) for `sigmoid` "
            "(SmPO, arXiv 2506.02698): `smpo` scales the DPO logit by 2p - 1 (SmPO's code), `cross_entropy` uses "
            "-p*logsigmoid(z) - (1-p)*logsigmoid(-z); `none` (default) is the hard label 1. p comes from a "
            "`soft_label` column, else from `chosen_score`/`rejected_score` columns as SmPO maps reward gaps: "
            "sigmoid((s_w - s_l) / (max - min of all scores)), else from Pick-a-Pic's `label_0` (1, or 0.5 for a tie "
            "kept with `keep_ties`). Logged as `labels/mean`.",
            "choices": ["none", "smpo", "cross_entropy"],
        },
    )
    keep_ties: bool = field(
        default=False,
        metadata={
            "help": "Keep Pick-a-Pic ties (label_0 == 0.5) as pairs with the soft label 0.5 instead of dropping them. "
            "Needs `soft_labels` (with the hard label a tie would train as a win)."
        },
    )
    timestep_min: float = field(
        default=0.0,
        metadata={
            "help": "Mask pairs whose noise level (timestep / number of training timesteps, in [0, 1]) is below this: "
            "they count as 0 in the batch mean (the clip-and-mask idea of arXiv 2505.21893). 0 (default) masks none. "
            "Logged as `timesteps/masked`."
        },
    )
    timestep_max: float = field(
        default=1.0,
        metadata={"help": "Mask pairs whose noise level is above this (see `timestep_min`). 1 (default) masks none."},
    )
    timestep_weight_power: float = field(
        default=0.0,
        metadata={
            "help": "Weight each pair's loss by noise_level ** power, moving the loss towards noisier timesteps, whose "
            "preference signal is weaker (the timestep-aware idea of arXiv 2505.18736). 0 (default) weights all "
            "timesteps alike."
        },
    )
    curriculum_stages: int = field(
        default=1,
        metadata={
            "help": "Curriculum-DPO ordering (Croitoru et al., CVPR 2025): pairs ranked from easy to hard by their "
            "label margin |2p - 1| (p as for `soft_labels`: a `soft_label` column or the reward gap of "
            "`chosen_score`/`rejected_score`), cut into this many equal parts; stage k of each epoch visits the "
            "k+1 easiest parts in a shuffled order that depends only on the seed, the epoch and the stage, so a "
            "resumed run sees the same batches. 1 (default) is the usual shuffled order. Logged as `curriculum/stage`."
        },
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Training resolution in pixels (square). Images are resized so their short side matches, then "
            "cropped. Defaults to the model's native resolution (the denoiser's sample size times the VAE factor); "
            "0, a negative or a fractional value is refused."
        },
    )
    random_crop: bool = field(
        default=False,
        metadata={"help": "Crop at a random position (the same for both images of a pair) instead of the centre."},
    )
    random_flip: bool = field(
        default=False,
        metadata={"help": "Flip both images of a pair horizontally together with probability 0.5."},
    )
    proportion_empty_prompts: float = field(
        default=0.0,
        metadata={
            "help": "Probability in [0, 1] that a pair's prompt is replaced by the empty prompt \"\" (both images keep "
            "the same prompt; for kto, per labelled image). Trains the unconditional prediction that classifier-free "
            "guidance uses at inference. The draw depends only on `seed` and the row, so it is the same in every epoch "
            "and after a resume. The reference Diffusion-DPO code uses 0.2; 0 (the default) keeps every prompt."
        },
    )
    precompute_latents: bool = field(
        default=False,
        metadata={
            "help": "Encode every image once with the VAE before training and train from the cache: no VAE forward "
            "in a training step. The latent distribution (mean and std) is stored and sampled at every step; with "
            "`random_flip` both orientations are stored; with `random_crop` each pair's (for kto, each image's) "
            "crop is drawn once, at cache time. Stored with `datasets`, reused across runs for datasets on disk. "
            "The VAE is on the accelerator only while it encodes (the denoiser waits on the CPU meanwhile). "
            "See docs/datasets.md."
        },
    )
    precompute_text_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Encode every distinct prompt once with the text encoders before training and train from the "
            "cache: no text encoder forward in a training step. Stored with `datasets`, reused across runs. The "
            "text encoders are on the accelerator only while they encode (the denoiser waits on the CPU meanwhile)."
        },
    )
    release_cached_encoders: bool = field(
        default=False,
        metadata={
            "help": "Once the caches exist, drop the encoders they replace instead of keeping them on the CPU: the "
            "text encoders after `precompute_text_embeddings`, the VAE after `precompute_latents` (set to None in "
            "the pipeline, so their memory, CPU RAM included, is freed). Training, evaluation on the cached datasets "
            "and saving work as before; sampling from `trainer.pipeline`, or data that was not cached, needs them "
            "back (reload the pipeline). See docs/memory.md."
        },
    )
    precompute_ref_errors: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference model's errors in one pass before training and train without a reference "
            "(TRL's `precompute_ref_log_probs`): no reference forward in a step, and a full fine-tune holds no frozen "
            "copy of the denoiser. Each pair's (for kto, each image's) noise, timestep, latent sample and flip are "
            "drawn per epoch from the seed, the row and the epoch, for the pass and for training alike. Needs "
            "`precompute_latents`. Stored with `datasets`, so runs with the same seed, data, model and number of "
            "epochs (e.g. a beta or learning-rate sweep) compute it once. See docs/performance.md."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum number of prompt tokens of the text encoders other than CLIP (CLIP encoders always use "
            "their 77 tokens); docs/models.md names each family's encoders. Defaults to the pipeline's own default. "
            "A prompt cache stores up to that many tokens per prompt. The on-policy trainers sample with the same "
            "embeddings they train on, so it applies to their rollouts too."
        },
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `DiffusionPipeline.from_pretrained` when `model` is an id or a path, e.g. "
            '`{"torch_dtype": "bfloat16", "variant": "fp16", "revision": "main"}`.'
        },
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `ref_model` is an id or a path."},
    )

    # Flow-matching models (the families built on families/flow.py): timestep sampling and guidance, as in diffusers'
    # training scripts.
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={
            "help": "How flow-matching models (velocity target in docs/models.md) draw the noise level: `logit_normal` "
            "(sigmoid of a normal with `logit_mean`/`logit_std`, SD3's training distribution, favouring mid-range "
            "noise), `uniform` (diffusers' `none`) or `mode` (with `mode_scale`). The draw indexes the scheduler's "
            "training sigmas. Ignored by SD1.x/2.x and SDXL, which draw timesteps uniformly.",
            "choices": ["logit_normal", "uniform", "mode"],
        },
    )
    logit_mean: float = field(
        default=0.0, metadata={"help": "Mean of the normal behind `weighting_scheme='logit_normal'`."}
    )
    logit_std: float = field(
        default=1.0, metadata={"help": "Standard deviation of the normal behind `weighting_scheme='logit_normal'`."}
    )
    mode_scale: float = field(
        default=1.29, metadata={"help": "Scale of `weighting_scheme='mode'` (diffusers' default 1.29)."}
    )
    guidance_scale: float = field(
        default=3.5,
        metadata={
            "help": "Guidance value fed to guidance-distilled FLUX checkpoints (`guidance_embeds=True`: FLUX.1-dev, "
            "FLUX.2 [dev]) during training; 3.5 is the FluxPipeline default at inference (Flux2Pipeline's is 4.0, "
            "diffusers' FLUX.2 script trains at 3.5). Ignored by other models (FLUX.2 [klein] has no guidance input)."
        },
    )

    # Video models (Wan): the clip taken from each video, the same window for both videos of a pair (docs/video.md).
    num_frames: int | None = field(
        default=None,
        metadata={
            "help": "Frames per training clip for video models. Must fit the VAE's temporal compression: k*4 + 1 "
            "for Wan (e.g. 33, 49, 81). None uses the model's default (81 for Wan). Ignored by image models."
        },
    )
    frame_stride: int = field(
        default=1,
        metadata={"help": "Take every n-th frame of a video (video models). Not together with `video_fps`."},
    )
    video_fps: float | None = field(
        default=None,
        metadata={
            "help": "Resample videos to this frame rate by skipping frames (stride = the video's fps / video_fps), "
            "e.g. 16 for Wan, whose clips are 16 fps. None keeps every `frame_stride`-th frame."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        resolution = self.resolution
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral)
                                       or resolution <= 0):
            raise ValueError(f"resolution must be a positive whole number of pixels, got {resolution!r}; leave it "
                             "unset (None) for the model's native resolution.")
        if self.curriculum_stages < 1:
            raise ValueError(f"curriculum_stages must be at least 1 (1 is no curriculum), got {self.curriculum_stages}.")
        if self.keep_ties and self.soft_labels == "none":
            raise ValueError("keep_ties=True needs soft_labels='smpo' or 'cross_entropy': with the hard label 1 a tie "
                             "would train as a win.")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}.")
        if self.accelerator_config.dispatch_batches is None:
            self.accelerator_config.dispatch_batches = False
        if self.dataloader_pin_memory and (self.use_cpu or not torch.accelerator.is_available()):
            # Pinned memory only speeds up copies to an accelerator; without one the DataLoader warns on every run.
            self.dataloader_pin_memory = False

    # Overridden TrainingArguments defaults.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: the collator needs the image and prompt columns."},
    )
    label_names: list[str] | None = field(
        default_factory=list,
        metadata={"help": "Kept empty: preference pairs have no label tensors."},
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X update steps. An integer, or a float in [0, 1) read as a ratio of total steps."
        },
    )


def config_defaults() -> SimpleNamespace:
    """Every `DiffusionDPOConfig` field at its default, without constructing a config: `TrainingArguments.__post_init__`
    sets up accelerate's process state, which must not happen again while a Trainer runs (a family built for sampling
    or evaluation in the middle of training reads its options from here)."""
    values = {}
    for f in dataclasses.fields(DiffusionDPOConfig):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return SimpleNamespace(**values)
