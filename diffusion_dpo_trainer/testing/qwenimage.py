"""Tiny offline QwenImagePipeline (and the Qwen2 tokenizer Z-Image shares) for tests."""

from pathlib import Path

from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import AddedToken, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .common import _WORDS, _byte_level_alphabet, _in_scratch_dir, _learn_bpe_merges, _seeded
from .registry import tiny_builder

# Words of Qwen-Image's prompt template, so it tokenizes to the 34 tokens the pipeline drops, as the real one does.
_TEMPLATE_WORDS = [
    "system", "Describe", "the", "image", "by", "detailing", "color", "shape", "size", "texture", "quantity", "text",
    "spatial", "relationships", "of", "objects", "and", "background", "user", "assistant",
]
# Qwen chat markup, a minimal stand-in for Qwen3's chat template (which with enable_thinking=True adds nothing more).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen-Image's published scheduler: the shift depends on the image size and is applied at inference only.
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}


def write_qwen2_tokenizer(path):
    """Write a byte-level BPE Qwen2 tokenizer (the class Qwen-Image and Z-Image load) to ``path`` and load it back.

    All 256 byte-level symbols are tokens, so any text tokenizes; known words (with or without their leading space,
    "Ġ" in byte-level form) are single tokens; ``<|im_start|>``/``<|im_end|>`` are special tokens and a chat template
    writes Qwen's chat markup for ``apply_chat_template``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(_WORDS + _TEMPLATE_WORDS))
    merges = _learn_bpe_merges(["\u0120" + w for w in words] + words, end_of_word="")
    vocab = {symbol: i for i, symbol in enumerate(_byte_level_alphabet())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in ("<|im_start|>", "<|im_end|>")])
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return Qwen2Tokenizer.from_pretrained(path)


@tiny_builder("QwenImagePipeline")
def make_qwenimage_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny QwenImagePipeline: a 3D-causal VAE (4 latent channels, vae_scale_factor 4, per-channel
    latents_mean/std that are not 0/1 so the normalisation is exercised), 2x2 packing (16 transformer input channels),
    a Qwen2.5-VL text encoder whose width is the transformer's joint_attention_dim. Render at an explicit height and
    width: the pipeline's default is 1024 px, whatever `sample_size`."""
    tokenizer = _in_scratch_dir(write_qwen2_tokenizer)
    hidden = 16
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.pad_token_id,
                     # Multimodal rotary sections (time, height, width) sum to half the head width (8).
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden},
        hidden_size=hidden,
        vocab_size=len(tokenizer),
    )
    with _seeded(seed + 1):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    z_dim = 4
    with _seeded(seed):
        vae = AutoencoderKLQwenImage(
            base_dim=6 * z_dim, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
        )
    with _seeded(seed + 2):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=hidden, guidance_embeds=False,
            # Rotary dims per (frame, row, column) axis; must sum to attention_head_dim.
            axes_dims_rope=(8, 4, 4),
        )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)
