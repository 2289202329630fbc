"""The interface every model family implements, so the trainer never needs to know which model it trains.

A family wraps a loaded diffusers pipeline and answers: how prompts become conditioning tensors, how pixels become
latents, how noise and timesteps are drawn, what the training target is, and how the denoiser is called.
"""

import torch
from diffusers import DiffusionPipeline


class DiffusionFamily:
    """Base class. Subclasses set the class attributes and implement the abstract methods."""

    #: Names of the diffusers pipeline classes this family trains.
    pipeline_class_names: tuple[str, ...] = ()
    #: Attribute of the pipeline that holds the trainable denoiser.
    denoiser_name: str = "unet"
    #: Extra keyword arguments for `from_pretrained`, e.g. to skip a safety checker we never run.
    load_kwargs: dict = {}
    #: The beta used when `DiffusionDPOConfig.beta` is None, in the mean-reduced `-beta/2` convention.
    default_beta: float
    #: LoRA `target_modules` used when a `peft_config` leaves them unset.
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: Video families: frames per latent frame of the VAE (a clip of k * this + 1 frames encodes to k + 1 latent
    #: frames), and the clip length used when `DiffusionDPOConfig.num_frames` is None. None for image families.
    temporal_compression: int | None = None
    default_num_frames: int | None = None

    def __init__(self, pipeline: DiffusionPipeline, max_prompt_length: int | None = None, args=None):
        """`args` is the trainer's `DiffusionDPOConfig` (or None): families read the options that concern them."""
        self.pipeline = pipeline
        self.max_prompt_length = max_prompt_length
        self.args = args
        self.vae = pipeline.vae
        self.vae_scale_factor = self.spatial_compression()

    @classmethod
    def check_pipeline_config(cls, config: dict) -> None:
        """Refuse an unsupported checkpoint from its `model_index.json`, before any weights are downloaded."""

    def spatial_compression(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ----- components ---------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self.pipeline, n) for n in names if getattr(self.pipeline, n, None) is not None]

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Everything but the denoiser: never trained, moved and cast by the trainer."""
        return [self.vae, *self.text_encoders]

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
        return (self.vae.config.latent_channels, *(side // self.vae_scale_factor for side in pixel_shape[-2:]))

    # ----- data -> tensors ----------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning tensors for a batch of prompts, one row per prompt."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE's latent distribution (unscaled), so a cache can sample later."""
        dist = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's latent space (shift, then scale)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def time_conditioning(self, batch: dict, resolution: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-image conditioning other than the prompt (SDXL's micro-conditioning); rows: winners, then losers."""
        return {}

    # ----- the diffusion process ----------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def noisy_latents_and_target(self, x0, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict(self, denoiser, noisy_latents, timesteps, conditioning: dict) -> torch.Tensor:
        raise NotImplementedError

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
        state, *_ = type(self.pipeline).lora_state_dict(input_dir)
        prefix = f"{self.denoiser_name}."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
