"""A tiny, randomly initialised, offline `WanPipeline` and toy video preference data for tests.

The components follow diffusers' own Wan pipeline tests (a 3-level Wan VAE with base_dim 3: 8x spatial and 4x
temporal compression, 16 latent channels; a 2-block transformer with (1, 2, 2) patches), with a small UMT5 encoder
and T5 tokenizer written locally. The scheduler is the one Wan checkpoints ship: UniPC with flow sigmas and
`flow_shift`. Everything is saved with `save_pretrained` and loaded by path, as users load the real checkpoints.
"""

import numpy as np
from datasets import Dataset, Features, Value
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from ..video_data import encode_video
from .common import _in_scratch_dir, _seeded, write_t5_tokenizer
from .registry import tiny_builder

#: Wan 2.1 480P's sampling shift; the tiny pipeline's training sigmas use it too.
FLOW_SHIFT = 3.0
#: The clip length tests train and sample with: 2 latent frames, the cheapest clip that still has time in it.
TINY_NUM_FRAMES = 5


def colour_ramp(num_frames, colour=(230, 80, 40), start=0.1, end=0.9, size=32):
    """Frames (F, H, W, 3) uint8 of a solid `colour` whose brightness goes from `start` to `end` (fractions)."""
    levels = np.linspace(start, end, num_frames)[:, None, None, None]
    return np.broadcast_to(levels * np.asarray(colour, dtype=np.float64), (num_frames, size, size, 3)).astype(np.uint8)


def make_video_preference_dataset(n=4, num_frames=9, size=32, container="mp4", seed=0):
    """Toy video pairs: `chosen` brightens over time, `rejected` is the same clip played backwards (it darkens).

    Both videos hold the same frames, so only the direction of time separates them: a preference a working video DPO
    loop learns quickly. Videos are encoded mp4 (or webm) bytes, read back with PyAV like user data.
    """
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = [], [], []
    for i in range(n):
        colour = tuple(int(c) for c in rng.integers(60, 256, size=3))
        frames = colour_ramp(num_frames, colour, size=size)
        prompts.append(f"a {['red', 'blue', 'green', 'yellow'][i % 4]} square")
        chosen.append(encode_video(frames, container=container))
        rejected.append(encode_video(frames[::-1], container=container))
    features = Features({"prompt": Value("string"), "chosen": Value("binary"), "rejected": Value("binary")})
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}, features=features)


@tiny_builder("WanPipeline", data=make_video_preference_dataset,
              call_kwargs={"num_frames": TINY_NUM_FRAMES, "max_sequence_length": 16})
def build_tiny_wan_pipeline(path, seed=0):
    """Build and save a tiny Wan 2.1-style `WanPipeline` at `path`; returns the path as a string.

    Videos of 4k+1 frames at multiples of 16 px (8x VAE, 2x2 patches) fit: 32x32 px and 5 or 9 frames are cheap.
    """
    tokenizer = _in_scratch_dir(write_t5_tokenizer)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed + 1):
        text_encoder = UMT5EncoderModel(config).eval()
    with _seeded(seed):
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        # A random VAE's posterior has std ~1, which would drown what it encodes (latent differences between
        # videos are ~1e-3); a trained VAE's posterior is narrow. A log-variance bias of -8 gives std ~0.02.
        vae.quant_conv.bias.data[vae.config.z_dim:] = -8.0
    with _seeded(seed + 2):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=config.d_model, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)
