"""Wan text-to-video (`WanPipeline`: Wan 2.1 T2V 1.3B/14B, Wan 2.2 TI2V-5B used for text-to-video).

Latents are (B, C, F, H, W): the Wan VAE compresses 4k+1 frames to k+1 latent frames and 8x8 (16x16 for the Wan 2.2
VAE) pixels to one, and its latents are normalised per channel with the VAE config's `latents_mean`/`latents_std`,
the inverse of what `WanPipeline` does before decoding. Prompts are encoded by the pipeline's own UMT5 path (padded
to `max_sequence_length`, 512 as at inference). Noising is rectified flow with the velocity target, on the sigma
grid of the pipeline scheduler's `flow_shift` (Wan ships a UniPC sampler whose config holds the shift; training
draws from a flow-matching Euler schedule with that shift, as finetrainers and DiffSynth-Studio train Wan).

Wan 2.2 A14B (two experts, `transformer` for high noise and `transformer_2` for low noise, split at
`boundary_ratio`) is refused: see `check_pipeline_config`.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .flow import FlowMatchingFamily

TWO_EXPERT_MESSAGE = (
    "Wan 2.2 A14B checkpoints (two experts: `transformer` for high noise, `transformer_2` for low noise, switched at "
    "`boundary_ratio`) are not supported: DPO on one expert needs its timesteps restricted to that expert's range and "
    "the adapter saved and loaded into that expert (`load_into_transformer_2`), and neither is implemented yet. Train "
    "Wan 2.1 T2V (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers) or Wan 2.2 TI2V-5B "
    "(Wan-AI/Wan2.2-TI2V-5B-Diffusers), which have a single transformer."
)


class WanFamily(FlowMatchingFamily):
    pipeline_class_names = ("WanPipeline",)
    denoiser_name = "transformer"
    #: 5000 (the SD1.5/SDXL value) times E[(1 - s)^2] ~ 0.11 under shift 3 (Wan's 480P flow_shift) and logit-normal
    #: sampling gives ~570, as for SD3 (a velocity error is an epsilon error divided by 1 - s); the per-sample mse is
    #: a mean over latent elements, so more frames do not change the scale.
    default_beta = 500.0
    #: Self-attention (attn1) and cross-attention to the prompt (attn2) projections, plus the feed-forward layers
    #: (ffn.net.0.proj, ffn.net.2) of every block, for motion as well as appearance.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    #: WanPipeline's default clip length (81 frames: 5 s at Wan's 16 fps).
    default_num_frames = 81

    def __init__(self, pipeline, args=None):
        self.check_pipeline_config(dict(pipeline.config))
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError(TWO_EXPERT_MESSAGE)
        super().__init__(pipeline, args)
        self.temporal_compression = int(self.vae_config.scale_factor_temporal)
        channels = self.vae_config.z_dim
        self._latents_mean = torch.tensor(self.vae_config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
        self._latents_std = torch.tensor(self.vae_config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)

    @classmethod
    def check_pipeline_config(cls, config):
        second = config.get("transformer_2")
        has_second = bool(second) and not (isinstance(second, (list, tuple)) and second[0] is None)
        if has_second or config.get("boundary_ratio") is not None:
            raise ValueError(TWO_EXPERT_MESSAGE)

    #: WanPipeline runs the prompt's branch, then the negative's as a second forward.
    guidance_batched = False

    def sampling_kwargs(self):
        return {"num_frames": self.default_num_frames if self.args.num_frames is None else self.args.num_frames}

    def spatial_compression(self):
        return int(self.vae_config.scale_factor_spatial)

    def training_scheduler(self):
        # Wan ships UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...); a FlowMatchEuler config has `shift`.
        config = self.pipeline.scheduler.config
        shift = config.get("flow_shift") or config.get("shift") or 1.0
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config["num_train_timesteps"], shift=float(shift))

    def native_resolution(self):
        # Wan 2.1 generates 480P by default (WanPipeline: 480x832); training crops are square.
        return 480

    def resolution_multiple(self):
        # The transformer groups latents in (1, 2, 2) patches.
        return self.vae_scale_factor * self.denoiser.config.patch_size[1]

    def latent_shape(self, pixel_shape):
        _, frames, height, width = pixel_shape
        scale = self.vae_scale_factor
        return (self.vae_config.z_dim, (frames - 1) // self.temporal_compression + 1, height // scale, width // scale)

    def scale_latents(self, latents):
        mean = self._latents_mean.to(latents.device, latents.dtype)
        std = self._latents_std.to(latents.device, latents.dtype)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        embeds, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device,
            max_sequence_length=self.max_prompt_length or 512,
        )
        return {"encoder_hidden_states": embeds}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        # One timestep per sample. TI2V-5B (`expand_timesteps`) takes one per token at inference, all equal for
        # text-to-video, which the transformer embeds exactly as the single value.
        return denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]
