"""Tiny offline SanaPipeline (and a Gemma tokenizer written from a small vocabulary) for tests."""

import string
from pathlib import Path

from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from .common import _WORDS, _in_scratch_dir, _learn_bpe_merges, _seeded
from .registry import tiny_builder

# Sana's published scheduler (Sana_1600M_*_diffusers): DPM-Solver++ on flow sigmas with a static shift of 3.
SANA_SCHEDULER = {
    "num_train_timesteps": 1000, "algorithm_type": "dpmsolver++", "solver_order": 2,
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0, "final_sigmas_type": "zero",
}


def write_gemma_tokenizer(path):
    """Write a tiny Gemma tokenizer (BPE with byte fallback, "▁" for spaces, a <bos> first) to ``path`` and load it.

    Every byte has a fallback token, so any text tokenizes; ASCII characters and known words (with or without their
    "▁") are single tokens.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merges = _learn_bpe_merges(["\u2581" + w for w in _WORDS] + list(_WORDS), end_of_word="")
    vocab = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    for symbol in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(symbol, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True).save_pretrained(path)
    return GemmaTokenizer.from_pretrained(path)


@tiny_builder("SanaPipeline", call_kwargs={"use_resolution_binning": False})
def make_sana_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny SanaPipeline: a deterministic DC-AE (4 latent channels, vae_scale_factor 2), a linear-
    attention transformer with patch size 1 whose caption width is the Gemma2 encoder's hidden size, and Sana's own
    DPM-Solver flow scheduler (shift 3)."""
    tokenizer = _in_scratch_dir(write_gemma_tokenizer)
    hidden = 8
    config = Gemma2Config(
        head_dim=16, hidden_size=hidden, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer), attn_implementation="eager",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed + 1):
        text_encoder = Gemma2Model(config).eval()
    with _seeded(seed):
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
            decoder_act_fns="silu", scaling_factor=0.41407,
        )
    with _seeded(seed + 2):
        transformer = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=hidden,
            sample_size=sample_size // 2,
        )
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)
