"""Tiny Stable Diffusion 3 pipeline."""

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from .common import (
    _VAE_SCALE_FACTOR,
    _clip_text_encoder,
    _in_scratch_dir,
    _seeded,
    _t5_encoder,
    _vae,
    write_clip_tokenizer,
    write_t5_tokenizer,
)
from .registry import tiny_builder


@tiny_builder("StableDiffusion3Pipeline")
def make_sd3_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny StableDiffusion3Pipeline (16 latent channels, vae_scale_factor 2, patch 2).

    The transformer's context is the two CLIP hidden states concatenated
    (32 + 32) and zero-padded to the T5 width, so T5's d_model (64) is the
    ``joint_attention_dim``; the pooled input is both CLIP projections (32 + 32).
    """
    clip_tokenizer = _in_scratch_dir(write_clip_tokenizer)
    t5_tokenizer = _in_scratch_dir(write_t5_tokenizer)
    text_encoder = _clip_text_encoder(clip_tokenizer, seed + 1, with_projection=True)
    text_encoder_2 = _clip_text_encoder(clip_tokenizer, seed + 2, with_projection=True)
    text_encoder_3 = _t5_encoder(t5_tokenizer, seed + 3, d_model=64)
    heads, head_dim = 2, 16
    with _seeded(seed + 4):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size // _VAE_SCALE_FACTOR,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_encoder_3.config.d_model,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
            # Largest latent grid (in patches) the positional table covers: 128 px images.
            pos_embed_max_size=32,
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed, sample_size, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


