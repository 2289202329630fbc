"""FLUX.2 [dev] and [klein]: one LLM text encoder, latents patchified 2x2 and batch-normalised, 4-axis position ids.

Both pipelines share the transformer (`Flux2Transformer2DModel`) and the VAE (`AutoencoderKLFlux2`); they differ in the
text encoder (Mistral-3 for [dev], Qwen3 for [klein]), which their own `encode_prompt` runs, and in the guidance
embedding ([dev] is guidance-distilled, [klein] is not), which the transformer's config says. As in diffusers'
`train_dreambooth_lora_flux2{,_klein}.py`: VAE latents are patchified 2x2 (`_patchify_latents`), normalised with the
VAE's batch-norm running statistics, noised in that space with the scheduler's unshifted training sigmas, and packed
into tokens for the transformer, which sees t / 1000 and, for [dev], the guidance scale.
"""

import torch

from .flow import FlowMatchingFamily


class Flux2Family(FlowMatchingFamily):
    pipeline_class_names = ("Flux2Pipeline", "Flux2KleinPipeline")
    #: As FLUX.1 (velocity target, the same rectified-flow noising and logit-normal sampling): 5000 for epsilon-error
    #: SD models times E[(1 - s)^2] ~ 0.29 gives ~1470, rounded down to FLUX.1's 1000 so the two FLUX generations
    #: start from one value. No published FLUX.2 DPO beta exists yet: sweep 500-2000 (docs/beta-and-learning-rate.md).
    default_beta = 1000.0
    #: Both streams of the double-stream blocks' attention, and the single-stream blocks' fused QKV+MLP input
    #: projection. `__init__` adds each single-stream block's output projection by its full name
    #: (`single_transformer_blocks.<i>.attn.to_out`): the bare name also matches the double-stream blocks'
    #: `attn.to_out` ModuleList, which PEFT cannot wrap. diffusers' FLUX.2 scripts train the same layers minus the
    #: text stream (add_*_proj, to_add_out).
    lora_target_modules = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj",
    )

    def __init__(self, pipeline, args=None):
        super().__init__(pipeline, args)
        single_blocks = len(self.denoiser.single_transformer_blocks)
        self.lora_target_modules = type(self).lora_target_modules + tuple(
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(single_blocks)
        )
        # The VAE's batch-norm statistics of patchified latents, copied so that cached latents can be normalised after
        # the VAE is released.
        bn = self.vae.bn
        self.latent_mean = bn.running_mean.detach().clone().view(1, -1, 1, 1)
        self.latent_std = torch.sqrt(bn.running_var.detach().view(1, -1, 1, 1) + self.vae_config.batch_norm_eps)
        # [dev] is guidance-distilled and takes the guidance scale as an input; [klein] has no guidance embedding.
        self.guidance_scale = self.args.guidance_scale if self.denoiser.config.guidance_embeds else None

    def native_resolution(self):
        return self.pipeline.default_sample_size * self.vae_scale_factor

    #: [klein] runs the prompt's branch, then the negative's as a second forward (with the negative's own text ids,
    #: which `predict` makes from the negative's embeddings as the pipeline does); [dev] only embeds the scale.
    guidance_batched = False

    def guidance(self, guidance_scale):
        """[dev]'s `guidance_scale` is the guidance embedding's input; [klein] guides classifier-free above 1 unless
        its config says it is step-distilled (`is_distilled`, where the pipeline ignores the scale). Flux2Pipeline's
        config has no `is_distilled`: it has no classifier-free guidance at all."""
        if self.guidance_scale is not None:
            return "embedded"
        return "cfg" if guidance_scale > 1 and self.pipeline.config.get("is_distilled") is False else None

    def sampled_latents(self, latents, resolution):
        """The pipeline denoises the patch latents as tokens in row-major order: back to (B, C, H, W) patches."""
        side = resolution // (2 * self.vae_scale_factor)
        return latents.transpose(1, 2).reshape(len(latents), -1, side, side)

    def pipeline_latents(self, latents):
        return type(self.pipeline)._pack_latents(latents)

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        length = {"max_sequence_length": self.max_prompt_length} if self.max_prompt_length else {}
        # The text ids the pipeline also returns are (0, 0, 0, l) for l < sequence length: made in `predict`.
        embeds, _ = self.pipeline.encode_prompt(prompts, device=device, **length)
        return {"encoder_hidden_states": embeds}

    def scale_latents(self, latents):
        """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2) patches normalised by the VAE's batch-norm statistics."""
        patches = type(self.pipeline)._patchify_latents(latents)
        return (patches - self.latent_mean.to(patches)) / self.latent_std.to(patches)

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        """Pack (B, C, H, W) patch latents into H*W tokens, run the transformer, unpack to (B, C, H, W)."""
        pipeline_class = type(self.pipeline)
        batch, channels, height, width = noisy_latents.shape
        device = noisy_latents.device
        text = conditioning["encoder_hidden_states"]
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((batch,), float(self.guidance_scale), device=device, dtype=torch.float32)
        prediction = denoiser(
            hidden_states=pipeline_class._pack_latents(noisy_latents),
            timestep=timesteps / self.num_train_timesteps,
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=pipeline_class._prepare_text_ids(text).to(device),
            img_ids=pipeline_class._prepare_latent_ids(noisy_latents).to(device),
            return_dict=False,
        )[0]
        # The inverse of `_pack_latents` (tokens in row-major order, as `_prepare_latent_ids` numbers them).
        return prediction.transpose(1, 2).reshape(batch, channels, height, width)
