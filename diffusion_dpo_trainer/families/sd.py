"""Stable Diffusion 1.x/2.x: one CLIP encoder, DDPM noising, epsilon or v-prediction (read from the scheduler)."""

import torch
from diffusers import DDPMScheduler

from .base import DiffusionFamily


class StableDiffusionFamily(DiffusionFamily):
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    # The safety checker and its feature extractor only filter generated images; training never runs them.
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    #: The published Diffusion-DPO value for SD1.5 and SDXL (Wallace et al. 2023).
    default_beta = 5000.0
    #: The UNet's attention projections, as diffusers' Diffusion-DPO and LoRA scripts target.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    #: Diffusion-DPO's evaluation (its quick_samples notebook): the pipeline's scheduler, 50 steps, guidance 7.5.
    evaluation_sampling = {"num_inference_steps": 50, "guidance_scale": 7.5}

    def __init__(self, pipeline, args=None):
        super().__init__(pipeline, args)
        # A DDPM view of the pipeline's scheduler config gives the training noise schedule whatever sampler it ships.
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"Unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                "expected 'epsilon' or 'v_prediction'."
            )
        alphas_cumprod = scheduler.alphas_cumprod.double()
        self._alpha = alphas_cumprod.sqrt().float()
        self._sigma = (1.0 - alphas_cumprod).sqrt().float()

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        embeds, _ = self.pipeline.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def sample_timesteps(self, batch_size, device, generator=None):
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device, generator=generator)

    def schedule_timesteps(self, timesteps):
        return timesteps.round().long().clamp(0, self.num_train_timesteps - 1)

    def _coefficients(self, timesteps, like):
        if self._alpha.device != like.device:  # moved once, not every step
            self._alpha, self._sigma = self._alpha.to(like.device), self._sigma.to(like.device)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self._alpha[timesteps].view(shape), self._sigma[timesteps].view(shape)

    def noisy_latents_and_target(self, x0, noise, timesteps):
        alpha, sigma = self._coefficients(timesteps, x0)
        noisy = alpha * x0 + sigma * noise
        target = noise if self.prediction_type == "epsilon" else alpha * noise - sigma * x0
        return noisy, target

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        return denoiser(noisy_latents, timesteps, return_dict=False, **conditioning)[0]
