"""Tiny offline ZImagePipeline for tests."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from .common import _in_scratch_dir, _seeded, _vae
from .qwenimage import write_qwen2_tokenizer
from .registry import tiny_builder

# Z-Image-Turbo's published scheduler: a static shift, applied at training and inference alike.
Z_IMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


@tiny_builder("ZImagePipeline")
def make_zimage_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny ZImagePipeline: FLUX's VAE layout (16 latent channels, vae_scale_factor 2), a
    single-stream transformer with 2x2 patches whose caption width is the Qwen3 text encoder's hidden size, and the
    Qwen2 tokenizer with a chat template (the pipeline wraps prompts in Qwen's chat markup)."""
    tokenizer = _in_scratch_dir(write_qwen2_tokenizer)
    hidden = 16
    config = Qwen3Config(
        hidden_size=hidden, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed + 1):
        text_encoder = Qwen3Model(config).eval()
    with _seeded(seed + 2):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=hidden, t_scale=1000.0,
            # Rotary dims per (caption/frame, row, column) axis; must sum to dim / n_heads.
            axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
        )
        # The pad tokens are created with torch.empty: give them values so an uninitialised NaN cannot leak in.
        with torch.no_grad():
            transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
            transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER),
        vae=_vae(seed, sample_size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)
