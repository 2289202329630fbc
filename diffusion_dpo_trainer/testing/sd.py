"""Tiny Stable Diffusion 1.x/2.x and SDXL pipelines."""

from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from .common import _SD_BETAS, _clip_text_encoder, _in_scratch_dir, _unet, _vae, write_clip_tokenizer
from .registry import tiny_builder


@tiny_builder("StableDiffusionPipeline")
def make_sd_pipeline(path, prediction_type="epsilon", sample_size=32, seed=0):
    """Build and save a tiny StableDiffusionPipeline (4 latent channels, vae_scale_factor 2)."""
    tokenizer = _in_scratch_dir(write_clip_tokenizer)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed, sample_size, latent_channels=4, scaling_factor=0.18215),
        text_encoder=_clip_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        unet=_unet(seed + 2, sample_size, cross_attention_dim=32),
        scheduler=DDPMScheduler(**_SD_BETAS, prediction_type=prediction_type, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


@tiny_builder("StableDiffusionXLPipeline")
def make_sdxl_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny StableDiffusionXLPipeline (4 latent channels, vae_scale_factor 2).

    The UNet's cross-attention width is the concatenation of both encoders'
    penultimate hidden states (32 + 32), and its added "text_time" embedding
    takes 6 micro-conditioning ids times ``addition_time_embed_dim`` plus
    ``text_encoder_2``'s pooled projection.
    """
    tokenizer = _in_scratch_dir(write_clip_tokenizer)
    text_encoder = _clip_text_encoder(tokenizer, seed + 1)
    text_encoder_2 = _clip_text_encoder(tokenizer, seed + 2, with_projection=True)
    time_embed_dim = 8
    unet = _unet(
        seed + 3,
        sample_size,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed, sample_size, latent_channels=4, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading"),
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


