"""FLUX.1: CLIP (pooled) + T5 prompt encoding, latents packed in 2x2 patches with position ids, guidance embedding."""

from typing import ClassVar

import torch

from .flow import FlowMatchingFamily


class FluxFamily(FlowMatchingFamily):
    pipeline_class_names = ("FluxPipeline",)
    #: 5000 (the SD1.5/SDXL value) times E[(1 - s)^2] ~ 0.29 under unshifted logit-normal sampling (a velocity error is
    #: an epsilon error divided by 1 - s) gives ~1470; TangoFlux's DPO on a FLUX transformer uses 2000.
    default_beta = 1000.0
    pipeline_prompt_names: ClassVar[dict[str, str]] = {
        "encoder_hidden_states": "prompt_embeds",
        "pooled_projections": "pooled_prompt_embeds",
    }

    def __init__(self, pipeline, args=None):
        super().__init__(pipeline, args)
        # Guidance-distilled checkpoints (FLUX.1-dev) take the guidance scale as an input; FLUX.1-schnell does not.
        self.guidance_scale = self.args.guidance_scale if self.denoiser.config.guidance_embeds else None

    def native_resolution(self):
        return self.pipeline.default_sample_size * self.vae_scale_factor

    def guidance(self, guidance_scale):
        """FLUX.1's `guidance_scale` is the guidance-distilled model's input (FLUX.1-dev), never classifier-free
        guidance: that is `true_cfg_scale` with a negative prompt, which no trainer passes."""
        return "embedded" if self.guidance_scale is not None else None

    def sampled_latents(self, latents, resolution):
        """FluxPipeline denoises packed 2x2 patch tokens: unpack them to (B, C, H, W)."""
        return type(self.pipeline)._unpack_latents(latents, resolution, resolution, self.vae_scale_factor)

    def pipeline_latents(self, latents):
        return type(self.pipeline)._pack_latents(latents, *latents.shape)

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        length = {"max_sequence_length": self.max_prompt_length} if self.max_prompt_length else {}
        # The text ids the pipeline also returns are zeros shaped by the sequence length: made in `predict`.
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=device, **length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        """Pack (B, C, H, W) latents into 2x2 patch tokens, run the transformer, unpack to (B, C, H, W)."""
        pipeline_class = type(self.pipeline)
        batch, channels, height, width = noisy_latents.shape
        packed = pipeline_class._pack_latents(noisy_latents, batch, channels, height, width)
        device, dtype = noisy_latents.device, noisy_latents.dtype
        image_ids = pipeline_class._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((batch,), float(self.guidance_scale), device=device, dtype=torch.float32)
        prediction = denoiser(
            hidden_states=packed,
            timestep=timesteps / self.num_train_timesteps,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return pipeline_class._unpack_latents(
            prediction, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )
