"""Tiny FLUX.1 pipeline."""

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from .common import (
    _clip_text_encoder,
    _in_scratch_dir,
    _seeded,
    _t5_encoder,
    _vae,
    write_clip_tokenizer,
    write_t5_tokenizer,
)
from .registry import tiny_builder


@tiny_builder("FluxPipeline")
def make_flux_pipeline(path, sample_size=32, seed=0, guidance_embeds=False):
    """Build and save a tiny FluxPipeline (16 latent channels, vae_scale_factor 2, 2x2 packing).

    Latents are packed into 2x2 patches, so the transformer sees
    ``4 * 16 = 64`` input channels; the pooled input is the CLIP pooler output
    and the context is T5's hidden states. ``sample_size`` only sets the VAE's
    config: FluxPipeline ignores the transformer for its default resolution.
    """
    clip_tokenizer = _in_scratch_dir(write_clip_tokenizer)
    t5_tokenizer = _in_scratch_dir(write_t5_tokenizer)
    text_encoder = _clip_text_encoder(clip_tokenizer, seed + 1)
    text_encoder_2 = _t5_encoder(t5_tokenizer, seed + 2, d_model=32)
    with _seeded(seed + 3):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=guidance_embeds,
            # Rotary dims per (text/id, row, column) axis; must sum to attention_head_dim.
            axes_dims_rope=(4, 6, 6),
        )
    # FLUX.1's scheduler: the shift depends on image size, so the pipeline passes `mu`.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed, sample_size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


