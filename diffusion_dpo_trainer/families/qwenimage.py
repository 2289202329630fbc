"""Qwen-Image: Qwen2.5-VL prompt encoding with a padding mask, a 3D (video-style) VAE with per-channel latent
normalisation, latents packed in 2x2 patches with rotary positions from the image shape, an MMDiT transformer."""

from typing import ClassVar

import torch

from .flow import FlowMatchingFamily


class QwenImageFamily(FlowMatchingFamily):
    pipeline_class_names = ("QwenImagePipeline",)
    #: As FLUX.1: Qwen-Image's scheduler shifts by image size at inference only, so training sigmas are unshifted, and
    #: 5000 (the SD1.5/SDXL value) times E[(1 - s)^2] ~ 0.29 under logit-normal sampling (a velocity error is an
    #: epsilon error divided by 1 - s) gives ~1470; rounded down to FLUX.1's 1000 for the same reason.
    default_beta = 1000.0
    #: The pipeline's own `max_sequence_length` default at inference: prompts are truncated as sampling truncates them.
    default_max_prompt_length = 512

    pipeline_prompt_names: ClassVar[dict[str, str]] = {
        "encoder_hidden_states": "prompt_embeds",
        "encoder_hidden_states_mask": "prompt_embeds_mask",
    }

    def pipeline_prompt_kwargs(self, conditioning, negative=None):
        """Without the padding every prompt shares: the pipeline's own encoding pads only to the batch's longest."""
        length = int(conditioning["encoder_hidden_states_mask"].sum(dim=1).max())
        return super().pipeline_prompt_kwargs({key: value[:, :length] for key, value in conditioning.items()})

    def native_resolution(self):
        return self.pipeline.default_sample_size * self.vae_scale_factor

    def guidance(self, guidance_scale) -> str | None:
        """The pipeline's `guidance_scale` feeds only guidance-distilled checkpoints, which this family does not train;
        its classifier-free guidance is `true_cfg_scale` with a negative prompt, which no trainer passes."""
        return None

    def sampled_latents(self, latents, resolution):
        """The pipeline denoises packed 2x2 patch tokens: unpack them to (B, C, H, W)."""
        return type(self.pipeline)._unpack_latents(latents, resolution, resolution, self.vae_scale_factor).squeeze(2)

    def pipeline_latents(self, latents):
        return type(self.pipeline)._pack_latents(latents, *latents.shape)

    def latent_shape(self, pixel_shape):
        return (self.vae_config.z_dim, *(side // self.vae_scale_factor for side in pixel_shape[-2:]))

    @torch.no_grad()
    def encode_pixels(self, pixel_values):
        """The VAE is a video VAE: images go in as one-frame clips, (B, C, 1, H, W), and come out as (B, C, H, W)."""
        pixels = pixel_values.to(self.vae.device, self.vae.dtype).unsqueeze(2)
        dist = self.vae.encode(pixels).latent_dist
        return dist.mean.squeeze(2).float(), dist.std.squeeze(2).float()

    def scale_latents(self, latents):
        """Per-channel normalisation with the VAE's `latents_mean`/`latents_std` (no single scaling factor)."""
        shape = (1, -1, *([1] * (latents.ndim - 2)))
        mean = torch.tensor(self.vae_config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(self.vae_config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        """Embeddings and their mask, zero-padded to a fixed length so a cache has one shape; `predict` drops the
        padding every prompt of a batch has, so the transformer sees what the pipeline gives it."""
        length = self.max_prompt_length or self.default_max_prompt_length
        embeds, mask = self.pipeline.encode_prompt(prompts, device=device, max_sequence_length=length)
        if mask is None:  # the pipeline returns None when no prompt of the batch is padded
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = length - embeds.shape[1]
        return {
            "encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
            "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad)),
        }

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        """Pack (B, C, H, W) latents into 2x2 patch tokens, run the transformer, unpack to (B, C, H, W)."""
        pipeline_class = type(self.pipeline)
        batch, channels, height, width = noisy_latents.shape
        mask = conditioning["encoder_hidden_states_mask"].bool()
        # Text rotary positions do not depend on the padded length and padded keys are masked out: trimming the
        # padding all rows share changes nothing but the cost.
        length = int(mask.sum(dim=1).max())
        mask = mask[:, :length]
        prediction = denoiser(
            hidden_states=pipeline_class._pack_latents(noisy_latents, batch, channels, height, width),
            encoder_hidden_states=conditioning["encoder_hidden_states"][:, :length],
            # None when no prompt is padded, as the pipeline passes it (another attention path: GRPO's exact ratio).
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            timestep=timesteps / self.num_train_timesteps,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        unpacked = pipeline_class._unpack_latents(
            prediction, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )
        return unpacked.squeeze(2)
