"""Z-Image: Qwen3 prompt encoding (Qwen's chat markup, second-to-last hidden state, padding removed), a single-stream
transformer called on lists of one-frame latents and of variable-length caption features, with time running from 0
(noise) to 1 (image) and a prediction of image minus noise."""

import torch

from .flow import FlowMatchingFamily


class ZImageFamily(FlowMatchingFamily):
    pipeline_class_names = ("ZImagePipeline",)
    #: As SD3: Z-Image's scheduler has a static shift that training uses too (3 in Z-Image-Turbo's config), and 5000
    #: (the SD1.5/SDXL value) times E[(1 - s)^2] ~ 0.11 under shift 3 and logit-normal sampling (a velocity error is
    #: an epsilon error divided by 1 - s) gives ~570 (~260 at shift 6).
    default_beta = 500.0
    #: A single-stream transformer: the image and text tokens share these projections (diffusers' Z-Image LoRA
    #: script's defaults). Its feed-forwards (feed_forward.w1, w2, w3) add capacity.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    #: The pipeline's own `max_sequence_length` default.
    default_max_prompt_length = 512

    def pipeline_prompt_kwargs(self, conditioning, negative=None):
        """The pipeline takes one (tokens, width) tensor per prompt: the padded cache rows without their padding."""
        def tokens(entry):
            return [embed[keep] for embed, keep in zip(entry["cap_feats"], entry["cap_mask"].bool())]

        return {"prompt_embeds": tokens(conditioning),
                **({"negative_prompt_embeds": tokens(negative)} if negative is not None else {})}

    def native_resolution(self):
        return 1024  # ZImagePipeline's default height and width

    def guidance(self, guidance_scale):
        """Z-Image guides classifier-free at any scale above 0 (Z-Image-Turbo samples at 0)."""
        return "cfg" if guidance_scale > 0 else None

    def guided_prediction(self, denoiser, latents, timesteps, conditioning, negative, guidance_scale):
        """ZImagePipeline batches the prompt's rows FIRST and combines in float32 as pos + s (pos - neg), so 1.0
        guides too. `predict` returns the negated output, which changes no bit of that arithmetic. The pipeline's
        `cfg_normalization` and `cfg_truncation` are off by default, and no rollout passes them."""
        if negative is None:
            return self.predict(denoiser, latents, timesteps, conditioning)
        rows = {key: torch.cat([value, negative[key]]) for key, value in conditioning.items()}
        output = self.predict(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), rows)
        conditional, unconditional = output.float().chunk(2)
        unconditional = unconditional.detach()
        return conditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        """The pipeline returns one (tokens, width) tensor per prompt; they are zero-padded to a fixed length with a
        mask, so a cache has one shape, and `predict` hands the transformer each prompt's own tokens again."""
        length = self.max_prompt_length or self.default_max_prompt_length
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=False, max_sequence_length=length
        )
        padded = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), length, dtype=torch.long, device=padded.device)
        for row, embed in enumerate(embeds):
            padded[row, : len(embed)] = embed
            mask[row, : len(embed)] = 1
        return {"cap_feats": padded, "cap_mask": mask}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        mask = conditioning["cap_mask"].bool()
        captions = [embed[keep] for embed, keep in zip(conditioning["cap_feats"], mask)]
        outputs = denoiser(
            list(noisy_latents.unsqueeze(2).unbind(0)),  # one (C, 1, H, W) latent per image
            # The transformer's time is 1 - sigma, computed as the pipeline computes it (bit for bit: GRPO's ratio).
            (self.num_train_timesteps - timesteps) / self.num_train_timesteps,
            captions,
            return_dict=False,
        )[0]
        # Z-Image predicts x0 - eps; the flow-matching target is eps - x0 (diffusers' script negates it too).
        return -torch.stack(outputs).squeeze(2)
