"""Sana: Gemma2 prompt encoding with Sana's complex human instruction and an attention mask, a deterministic DC-AE
(32x downsampling, one scaling factor), a linear-attention transformer on unpacked latents, trained on the flow
sigmas of its DPM-Solver scheduler's `flow_shift`."""

import inspect
from typing import ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .flow import FlowMatchingFamily


class SanaFamily(FlowMatchingFamily):
    pipeline_class_names = ("SanaPipeline",)
    #: As SD3: Sana trains and samples with a static shift of 3 (`flow_shift`), and 5000 (the SD1.5/SDXL value) times
    #: E[(1 - s)^2] ~ 0.11 under shift 3 and logit-normal sampling (a velocity error is an epsilon error divided by
    #: 1 - s) gives ~570.
    default_beta = 500.0
    #: Query, key, value and output of both attentions (the linear self-attention and the cross-attention to the
    #: prompt); diffusers' Sana LoRA script's default is to_q, to_k, to_v.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipeline, args=None):
        super().__init__(pipeline, args)
        # The instruction SanaPipeline prepends when sampling (and Sana's own training configs use as `chi_prompt`):
        # training on the same conditioning aligns the model the user samples.
        default = inspect.signature(type(pipeline).__call__).parameters["complex_human_instruction"].default
        self.complex_human_instruction = list(default)

    pipeline_prompt_names: ClassVar[dict[str, str]] = {
        "encoder_hidden_states": "prompt_embeds",
        "encoder_attention_mask": "prompt_attention_mask",
    }

    @torch.no_grad()
    def unconditional_conditioning(self, conditioning, encode):
        """SanaPipeline encodes its negative "" WITHOUT the complex human instruction (so not as a prompt, and not
        from the text cache): its own encode_prompt, one "" per row, on the text encoder's device."""
        rows, device = len(conditioning["encoder_hidden_states"]), conditioning["encoder_hidden_states"].device
        length = {"max_sequence_length": self.max_prompt_length} if self.max_prompt_length else {}
        _, _, embeds, mask = self.pipeline.encode_prompt(
            [""] * rows, do_classifier_free_guidance=True, device=self.pipeline.text_encoder.device,
            complex_human_instruction=self.complex_human_instruction, **length,
        )
        return {"encoder_hidden_states": embeds.to(device), "encoder_attention_mask": mask.to(device)}

    #: SanaPipeline casts the transformer's output to float32 before combining the guidance branches.
    guidance_dtype = torch.float32

    def pipeline_prompt_kwargs(self, conditioning, negative=None):
        # The pipeline's `negative_prompt` defaults to "", which it refuses next to negative embeddings.
        kwargs = super().pipeline_prompt_kwargs(conditioning, negative)
        return {**kwargs, "negative_prompt": None} if negative is not None else kwargs

    def training_scheduler(self):
        """Sana ships a DPM-Solver scheduler on flow sigmas: its `flow_shift` is the static shift of the training
        sigmas (3 in Sana's training configs). A flow-matching Euler scheduler's config is used as it is."""
        config = self.pipeline.scheduler.config
        if config.get("use_flow_sigmas"):
            return FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift
            )
        return super().training_scheduler()

    def sampling_kwargs(self):
        # Binning would sample at the nearest trained aspect-ratio size and resize the images: not `resolution`.
        return {"use_resolution_binning": False}

    def resolution_multiple(self):
        return self.denoiser.config.patch_size * self.vae_scale_factor

    @torch.no_grad()
    def encode_pixels(self, pixel_values):
        """DC-AE is deterministic: its latent is the mean, with zero spread."""
        latents = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent.float()
        return latents, torch.zeros_like(latents)

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        length = {"max_sequence_length": self.max_prompt_length} if self.max_prompt_length else {}
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=device,
            complex_human_instruction=self.complex_human_instruction, **length,
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        return denoiser(
            noisy_latents,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            encoder_attention_mask=conditioning["encoder_attention_mask"],
            timestep=timesteps * self.denoiser.config.timestep_scale,  # 1 for Sana, as the pipeline scales it
            return_dict=False,
        )[0]
