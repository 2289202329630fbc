"""SDXL: two CLIP encoders, pooled text embeddings and micro-conditioning on image size and crop."""

from typing import ClassVar

import torch

from .sd import StableDiffusionFamily


class StableDiffusionXLFamily(StableDiffusionFamily):
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    load_kwargs = {}
    #: Diffusion-DPO's evaluation of SDXL: the pipeline's scheduler (Euler), 50 steps, guidance 5.
    evaluation_sampling = {"num_inference_steps": 50, "guidance_scale": 5.0}

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    pipeline_prompt_names: ClassVar[dict[str, str]] = {
        "encoder_hidden_states": "prompt_embeds",
        "text_embeds": "pooled_prompt_embeds",
    }

    def unconditional_conditioning(self, conditioning, encode):
        """SDXL's pipeline guides with zeroed embeddings (pooled too) for an empty negative prompt when its config says
        `force_zeros_for_empty_prompt` (the SDXL base checkpoint does); otherwise with the encoding of ""."""
        if self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            return {key: torch.zeros_like(value) for key, value in conditioning.items()}
        return super().unconditional_conditioning(conditioning, encode)

    def generated_conditioning(self, count, resolution):
        """A generated image's micro-conditioning: its own size, no crop."""
        return {"original_size": torch.tensor([resolution, resolution]).repeat(count, 1),
                "crop_top_left": torch.zeros(count, 2, dtype=torch.long)}

    def time_conditioning(self, batch, resolution, device):
        """add_time_ids = (original h, w, crop top, left, target h, w) per image, as SDXL was trained.

        Rows follow the batch: winners then losers for pairs, batch order for unpaired images.
        """
        rows = []
        for prefix in ("chosen_", "rejected_") if "chosen_original_size" in batch else ("",):
            original = batch[f"{prefix}original_size"]
            crop = batch[f"{prefix}crop_top_left"]
            target = original.new_tensor([resolution, resolution]).expand_as(original)
            rows.append(torch.cat([original, crop, target], dim=1))
        return {"time_ids": torch.cat(rows).to(device=device, dtype=torch.float32)}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(
            noisy_latents,
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
