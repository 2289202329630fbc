"""The interface every model family implements, so the trainer never needs to know which model it trains.

A family wraps a loaded diffusers pipeline and answers: how prompts become conditioning tensors, how pixels become
latents, how noise and timesteps are drawn, what the training target is, how the denoiser is called, and which
denoiser is the reference. Defining a concrete subclass checks it (every abstract method implemented, every required
class attribute set) and registers it for its pipeline classes: adding a family edits no other module.
"""

import abc
import copy
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

#: Class attributes a concrete family must set.
REQUIRED_ATTRIBUTES = ("pipeline_class_names", "denoiser_name", "default_beta", "lora_target_modules")

#: Pipeline class name -> the family that trains it. Filled as family classes are defined.
REGISTRY: dict[str, type["DiffusionFamily"]] = {}
#: Every registered family class, in definition order (the public list, kept for `from ... import FAMILIES`).
FAMILIES: list[type["DiffusionFamily"]] = []

#: Pipeline attributes that may hold a text encoder.
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


class _FamilyMeta(abc.ABCMeta):
    """Checks and registers each concrete family when its class statement runs (after ABCMeta has worked out the
    abstract methods, which `__init_subclass__` runs too early to see). `abstract=True` marks a shared base."""

    def __new__(mcls, name, bases, namespace, abstract: bool = False, **kwargs):
        return super().__new__(mcls, name, bases, namespace, **kwargs)

    def __init__(cls, name, bases, namespace, abstract: bool = False, **kwargs):
        super().__init__(name, bases, namespace, **kwargs)
        if abstract:
            return
        missing = sorted(cls.__abstractmethods__) + [a for a in REQUIRED_ATTRIBUTES if not hasattr(cls, a)]
        if missing:
            raise TypeError(
                f"Model family {name} does not define {', '.join(missing)}: a family sets the class attributes "
                f"{', '.join(REQUIRED_ATTRIBUTES)} and implements every abstract method of DiffusionFamily "
                "(see docs/architecture.md, 'Add a model family')."
            )
        if not cls.pipeline_class_names:
            raise TypeError(f"Model family {name} lists no pipeline_class_names.")
        taken = {c: REGISTRY[c].__name__ for c in cls.pipeline_class_names if c in REGISTRY}
        if taken:
            raise TypeError(f"Model family {name}: pipeline class(es) already trained by {taken}.")
        for pipeline_class in cls.pipeline_class_names:
            REGISTRY[pipeline_class] = cls
        FAMILIES.append(cls)


class DiffusionFamily(metaclass=_FamilyMeta, abstract=True):
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    `args` is the `DiffusionDPOConfig` the family reads its options from (`max_prompt_length`, flow-matching
    sampling, guidance, ...): typed fields with one default, in config.py.
    """

    #: Names of the diffusers pipeline classes this family trains.
    pipeline_class_names: ClassVar[tuple[str, ...]]
    #: Attribute of the pipeline that holds the trainable denoiser ("unet" or "transformer").
    denoiser_name: ClassVar[str]
    #: The beta used when `DiffusionDPOConfig.beta` is None, in the mean-reduced `-beta/2` convention.
    default_beta: ClassVar[float]
    #: Sampler settings papers evaluate this family with (`diffusion-dpo evaluate`'s defaults); empty: the pipeline's.
    evaluation_sampling: ClassVar[dict] = {}
    #: LoRA `target_modules` used when a `peft_config` leaves them unset.
    lora_target_modules: ClassVar[tuple[str, ...]]
    #: Extra keyword arguments for `from_pretrained`, e.g. to skip a safety checker we never run.
    load_kwargs: ClassVar[dict] = {}
    #: Video families: frames per latent frame of the VAE (a clip of k * this + 1 frames encodes to k + 1 latent
    #: frames), and the clip length used when `DiffusionDPOConfig.num_frames` is None. None for image families.
    temporal_compression: int | None = None
    default_num_frames: ClassVar[int | None] = None

    def __init__(self, pipeline: DiffusionPipeline, args=None):
        if args is None:
            from ..config import config_defaults  # the config imports nothing of ours; only the default is lazy

            args = config_defaults()
        self.pipeline = pipeline
        self.args = args
        self.vae = pipeline.vae
        # Kept apart from the VAE: cached latents are scaled with it after the VAE itself may have been released.
        self.vae_config = self.vae.config
        self.vae_scale_factor = self.spatial_compression()
        #: The explicit or frozen reference denoiser; None means the policy with its adapters switched off.
        self.ref_model: torch.nn.Module | None = None
        self._adapter_layers: list[BaseTunerLayer] | None = None
        #: A LoRA adapter that holds the reference (online DPO's synced reference): the reference switches to it
        #: instead of switching the adapters off.
        self.reference_adapter: str | None = None

    @classmethod
    def check_pipeline_config(cls, config: dict) -> None:
        """Refuse an unsupported checkpoint from its `model_index.json`, before any weights are downloaded."""

    def spatial_compression(self) -> int:
        """Pixels per latent pixel along each side: the pipeline's own factor (VAEs describe their depth differently:
        block_out_channels, temperal_downsample, encoder_block_out_channels; every image pipeline computes it)."""
        return int(self.pipeline.vae_scale_factor)

    @property
    def max_prompt_length(self) -> int | None:
        return self.args.max_prompt_length

    # ----- components ---------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, n) for n in TEXT_ENCODER_NAMES if getattr(self.pipeline, n, None) is not None]

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Everything but the denoiser: never trained, moved and cast by the trainer."""
        return [m for m in (self.vae, *self.text_encoders) if m is not None]

    def release(self, vae: bool = False, text_encoders: bool = False) -> None:
        """Drop the VAE and/or the text encoders (their outputs are cached) from the pipeline and this family, so
        nothing here keeps them alive and their memory is freed; the pipeline can then no longer encode or decode."""
        if vae:
            self.pipeline.vae = self.vae = None
        if text_encoders:
            for name in TEXT_ENCODER_NAMES:
                if getattr(self.pipeline, name, None) is not None:
                    setattr(self.pipeline, name, None)

    def native_resolution(self) -> int:
        sample_size = self.denoiser.config.sample_size
        if isinstance(sample_size, (tuple, list)):
            sample_size = sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    def resolution_multiple(self) -> int:
        """Training resolutions must be multiples of this (in pixels)."""
        return self.vae_scale_factor

    def latent_shape(self, pixel_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one sample's latents for one sample's pixels (C, H, W), without running the VAE."""
        return (self.vae_config.latent_channels, *(side // self.vae_scale_factor for side in pixel_shape[-2:]))

    def check_resolution(self, resolution: int) -> None:
        multiple = self.resolution_multiple()
        if resolution % multiple:
            raise ValueError(
                f"resolution={resolution} must be a multiple of {multiple} for {type(self.pipeline).__name__}."
            )

    # ----- the reference ------------------------------------------------------------------------------------------
    def set_reference(self, ref_model=None, init_kwargs: dict | None = None) -> None:
        """Choose the reference denoiser: None keeps the default (see `reference`); a pipeline, a denoiser module or
        an id/path of a pipeline (its denoiser subfolder is loaded) is used as given, frozen."""
        if ref_model is None:
            self.ref_model = None
            return
        if isinstance(ref_model, DiffusionPipeline):
            module = getattr(ref_model, self.denoiser_name)
        elif isinstance(ref_model, torch.nn.Module):
            module = ref_model
        elif isinstance(ref_model, (str, os.PathLike)):
            module = type(self.denoiser).from_pretrained(
                ref_model, subfolder=self.denoiser_name, use_safetensors=True, **dict(init_kwargs or {})
            )
        else:
            raise TypeError(f"`ref_model` must be a pipeline, a module or an id/path, got {type(ref_model).__name__}.")
        module.requires_grad_(False)
        module.eval()  # not chained: a DeepSpeed engine's eval() returns None
        self.ref_model = module

    def freeze_reference_copy(self) -> None:
        """A frozen copy of the denoiser as it is now: the reference of a full fine-tune."""
        self.set_reference(copy.deepcopy(self.denoiser))

    @property
    def has_adapters(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    @contextmanager
    def reference(self):
        """The reference denoiser: the explicit/frozen one, the policy's `reference_adapter` if set, or the policy with
        its LoRA adapters switched off (no second copy in memory). The one reference switch of the library: training,
        sampling and evaluation use it."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        if not self.has_adapters:
            raise ValueError(
                "There is no reference: the denoiser has no LoRA adapter to switch off and no reference model was "
                "given (pass `ref_model`, or a reference pipeline)."
            )
        if self._adapter_layers is None:
            # Found once: `disable_adapters()` walks every module (~2000 in SD1.5's UNet) on every call.
            self._adapter_layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        if self.reference_adapter is not None:
            with self._adapter_active(self.reference_adapter):
                yield self.denoiser
            return
        for layer in self._adapter_layers:
            layer.enable_adapters(False)
        try:
            yield self.denoiser
        finally:
            for layer in self._adapter_layers:
                layer.enable_adapters(True)

    @contextmanager
    def adapter_active(self, name: str):
        """The denoiser with LoRA adapter `name` active (and frozen) for the duration, the policy's adapter active and
        trainable after: a second adapter as a second model (DiffusionNFT's old policy)."""
        if self._adapter_layers is None:
            self._adapter_layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        with self._adapter_active(name):
            yield self.denoiser

    @contextmanager
    def _adapter_active(self, name: str):
        """Another adapter active (and frozen) for the duration; the policy's adapter active and trainable after."""
        active = [layer.active_adapters for layer in self._adapter_layers]
        for layer in self._adapter_layers:
            layer.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            for layer, names in zip(self._adapter_layers, active, strict=True):
                layer.set_adapter(names)

    @contextmanager
    def reference_pipeline(self):
        """The pipeline with the reference as its denoiser, for sampling from the reference."""
        with self.reference() as reference:
            policy = self.denoiser
            if reference is policy:
                yield self.pipeline
                return
            setattr(self.pipeline, self.denoiser_name, reference)
            try:
                yield self.pipeline
            finally:
                setattr(self.pipeline, self.denoiser_name, policy)

    # ----- data -> tensors ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompt(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning tensors for a batch of prompts, one row per prompt (through the pipeline's encode_prompt)."""

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE's latent distribution (unscaled), so a cache can sample later."""
        if self.vae is None:
            raise ValueError("The VAE was released once the latents were cached (release_cached_encoders=True): only "
                             "the datasets cached then can be used; reload the pipeline to encode other images.")
        dist = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's latent space (shift, then scale)."""
        shift = getattr(self.vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae_config.scaling_factor

    # ----- what a pipeline call samples (on-policy trainers train on it) ------------------------------------------
    def sampling_kwargs(self) -> dict:
        """Pipeline-call arguments a rollout passes so the pipeline samples what training expects (the configured
        size and clip length); none for most families."""
        return {}

    def sampled_latents(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """Latents of a pipeline's denoising loop (the final ones, as `callback_on_step_end` sees them, or a recorded
        trajectory's) in the denoiser-space (B, C, H, W) layout training uses; most pipelines keep them that way."""
        return latents

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `sampled_latents`: training-layout latents (or a prediction) in the layout of the pipeline's
        denoising loop, where GRPO recomputes a recorded step exactly as the rollout computed it."""
        return latents

    def generated_conditioning(self, count: int, resolution: int) -> dict[str, torch.Tensor]:
        """The per-image batch entries `time_conditioning` reads (without the side prefix), for `count` images this
        family's pipeline generated at `resolution` (on-policy batches): none for most families."""
        return {}

    def time_conditioning(self, batch: dict, resolution: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-image conditioning other than the prompt (SDXL's micro-conditioning); rows: winners, then losers."""
        return {}

    # ----- sampling with the training conditioning ----------------------------------------------------------------
    #: `encode_prompt`'s keys -> the pipeline call's keyword arguments; a negative's are "negative_" + those.
    pipeline_prompt_names: ClassVar[dict[str, str]] = {"encoder_hidden_states": "prompt_embeds"}

    def guidance(self, guidance_scale: float) -> str | None:
        """What the pipeline's `guidance_scale` does when sampling: "cfg" (classifier-free guidance: an unconditional
        branch per step, on `unconditional_conditioning`; most pipelines above 1), "embedded" (the input of a
        guidance-distilled model, which `predict` passes as well) or None (nothing). The one answer the rollout, the
        text cache and GRPO's training forward all follow."""
        return "cfg" if guidance_scale > 1 else None

    #: How the pipeline runs classifier-free guidance's two branches: one forward on [negative; prompt] rows (SD,
    #: SDXL, SD3, Sana), or, False, the prompt's forward and then the negative's (Wan, FLUX.2 [klein]).
    guidance_batched: ClassVar[bool] = True
    #: The dtype the pipeline combines the two branches in (Sana: float32); None: the denoiser output's own.
    guidance_dtype: ClassVar[torch.dtype | None] = None

    def guided_prediction(self, denoiser, latents, timesteps, conditioning: dict, negative: dict | None,
                          guidance_scale: float) -> torch.Tensor:
        """The model output the pipeline steps with at `guidance_scale`, recomputed for training (GRPO's ratio needs
        it bit for bit): `predict` alone without a `negative`; with one, the pipeline's classifier-free guidance,
        uncond + s (cond - uncond), its branches run as the pipeline runs them (`guidance_batched`, `guidance_dtype`)
        and the unconditional one detached (flow_grpo trains through the conditional branch). Override where the
        pipeline's guidance has another form (Z-Image)."""
        if negative is None:
            return self.predict(denoiser, latents, timesteps, conditioning)
        if self.guidance_batched:
            rows = {key: torch.cat([negative[key], value]) for key, value in conditioning.items()}
            output = self.predict(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), rows)
            unconditional, conditional = output.chunk(2)
        else:
            conditional = self.predict(denoiser, latents, timesteps, conditioning)
            with torch.no_grad():
                unconditional = self.predict(denoiser, latents, timesteps, negative)
        dtype = self.guidance_dtype or conditional.dtype
        unconditional, conditional = unconditional.detach().to(dtype), conditional.to(dtype)
        return unconditional + guidance_scale * (conditional - unconditional)

    def unconditional_conditioning(self, conditioning: dict, encode: Callable) -> dict[str, torch.Tensor]:
        """What the pipeline uses as its unconditional branch when no negative prompt is given, one row per row of
        `conditioning`: most pipelines encode "" as they encode a prompt (`encode`: the caller's encoder or text
        cache; one "" per row, as the pipeline batches them), so training and sampling guide with the same tensors."""
        return encode([""] * len(next(iter(conditioning.values()))))

    def pipeline_prompt_kwargs(self, conditioning: dict, negative: dict | None = None) -> dict:
        """`encode_prompt`'s tensors (and the unconditional ones) as the pipeline call's keyword arguments, in place
        of prompt strings: the pipeline then samples with exactly what training conditions on."""
        names = self.pipeline_prompt_names
        kwargs = {names[key]: value for key, value in conditioning.items()}
        kwargs.update({f"negative_{names[key]}": value for key, value in (negative or {}).items()})
        return kwargs

    # ----- the diffusion process ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """One training timestep per sample, as the denoiser takes it; drawn from `generator` (on `device`) when
        given, else from torch's global stream."""

    @abc.abstractmethod
    def noisy_latents_and_target(self, x0, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """The noised latents fed to the denoiser and the regression target of its prediction."""

    @abc.abstractmethod
    def predict(self, denoiser, noisy_latents, timesteps, conditioning: dict) -> torch.Tensor:
        """The denoiser's prediction, in the shape of `noisy_latents` (pack and unpack inside)."""

    def clean_estimate(self, noisy_latents, prediction, timesteps) -> torch.Tensor:
        """x0_hat, the clean sample a prediction implies at `noisy_latents`: with x_t = c x0 + d eps and the
        regression target a x0 + b eps (read from `noisy_latents_and_target` itself, so any parametrisation works),
        x0_hat = (b x_t - d prediction) / (b c - a d). Flow: x_t - sigma v; epsilon: (x_t - sigma eps) / alpha;
        v-prediction: alpha x_t - sigma v."""
        one, zero = torch.ones_like(noisy_latents, dtype=torch.float32), torch.zeros_like(noisy_latents,
                                                                                         dtype=torch.float32)
        c, a = self.noisy_latents_and_target(one, zero, timesteps)
        d, b = self.noisy_latents_and_target(zero, one, timesteps)
        return (b * noisy_latents.float() - d * prediction.float()) / (b * c - a * d)

    def schedule_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """A sampling scheduler's timesteps moved to the nearest timesteps of the training schedule, which
        `noisy_latents_and_target` accepts (DiffusionNFT trains at the rollout's timesteps)."""
        raise NotImplementedError(f"{type(self).__name__} cannot map sampling timesteps to its training schedule; use "
                                  "nft_timesteps='training'.")

    # ----- saving -------------------------------------------------------------------------------------------------
    def save_lora_weights(self, output_dir: str, lora_state_dict: dict, adapter_metadata: dict | None) -> None:
        """Write the adapter with the pipeline class's own `save_lora_weights`, so `load_lora_weights` reads it."""
        type(self.pipeline).save_lora_weights(
            output_dir,
            safe_serialization=True,
            **{f"{self.denoiser_name}_lora_layers": lora_state_dict},
            **({f"{self.denoiser_name}_lora_adapter_metadata": adapter_metadata} if adapter_metadata else {}),
        )

    def lora_state_dict(self, input_dir: str) -> dict[str, torch.Tensor]:
        """The denoiser's part of a saved diffusers-format LoRA, keys without the component prefix."""
        state = type(self.pipeline).lora_state_dict(input_dir)
        # SD1.x/SDXL return (state, alphas); the transformer pipelines (SD3, FLUX, ...) return the state alone.
        state = state[0] if isinstance(state, tuple) else state
        prefix = f"{self.denoiser_name}."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
