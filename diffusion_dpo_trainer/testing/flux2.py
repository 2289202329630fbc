"""Tiny FLUX.2 pipelines: [dev] (`Flux2Pipeline`, Mistral-3 text encoder) and [klein] (`Flux2KleinPipeline`, Qwen3).

Both share the FLUX.2 transformer and VAE: 4 latent channels here (32 in the real VAE), patchified 2x2 into 16 channels
(128 real) and normalised with the VAE's batch-norm statistics, which are set to non-trivial values so a missing or
misplaced normalisation changes every number. The text encoders have as many layers as the pipelines' default
`text_encoder_out_layers` need ((10, 20, 30) for dev, (9, 18, 27) for klein), each 16 wide, so the prompt embedding is
3 x 16 = 48 wide. Tokenizers are character-level byte-level BPE written from scratch, with a chat template.
"""

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .common import _byte_level_alphabet, _in_scratch_dir, _seeded
from .registry import tiny_builder

_TEXT_WIDTH = 16
_LATENT_CHANNELS = 4

# Mistral-style conversations: content is a list of typed parts ({"type": "text", "text": ...}).
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% for part in m['content'] %}{% if part['type'] == 'text' %}"
    "[{{ m['role'] }}]{{ part['text'] }}[/{{ m['role'] }}]{% endif %}{% endfor %}{% endfor %}"
)
# Qwen3's template, reduced to what Flux2KleinPipeline uses (string content, generation prompt, thinking switched off).
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_level_vocab(special_tokens):
    """A character-level byte-level BPE vocabulary (no merges): any UTF-8 text tokenizes, one token per byte."""
    return {token: i for i, token in enumerate([*_byte_level_alphabet(), *special_tokens])}


def write_qwen_tokenizer(path):
    """A Qwen2 tokenizer (what FLUX.2 [klein] ships) with Qwen's special tokens and a minimal chat template."""
    tokenizer = Qwen2Tokenizer(
        vocab=_byte_level_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), merges=[], unk_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"],
        model_max_length=512,
    )
    tokenizer.chat_template = _QWEN_TEMPLATE
    tokenizer.save_pretrained(path)
    return Qwen2Tokenizer.from_pretrained(path)


def write_mistral_tokenizer(path):
    """A byte-level tokenizer with Mistral's special tokens and a chat template over typed content parts.

    FLUX.2 [dev] ships a `PixtralProcessor`; Flux2Pipeline only calls its `apply_chat_template` on text, which a
    tokenizer answers the same way, and Pixtral's image processor would need torchvision.
    """
    backend = Tokenizer(models.BPE(vocab=_byte_level_vocab(["<unk>", "<s>", "</s>", "<pad>"]), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=512, chat_template=_MISTRAL_TEMPLATE,
    )
    tokenizer.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _mistral3_encoder(tokenizer, seed, layers=30):
    text = dict(
        model_type="mistral", vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=1024, sliding_window=None, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, image_size=16, patch_size=8, num_channels=3, head_dim=8)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=len(tokenizer) - 1,
                            vision_feature_layer=-1, spatial_merge_size=1)
    with _seeded(seed):
        return Mistral3ForConditionalGeneration(config).eval()


def _qwen3_encoder(tokenizer, seed, layers=27):
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    with _seeded(seed):
        return Qwen3ForCausalLM(config).eval()


def _flux2_vae(seed, sample_size):
    with _seeded(seed):
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
            latent_channels=_LATENT_CHANNELS, norm_num_groups=16, sample_size=sample_size, use_quant_conv=False,
            use_post_quant_conv=False,
        )
        # Batch-norm statistics of the patchified latents, as a trained VAE has them (fresh ones are 0 and 1).
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae.eval()


def _flux2_transformer(seed, guidance_embeds):
    with _seeded(seed):
        return Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            # 2 x 32 = 64 wide: bitsandbytes' CPU 4-bit kernels need input widths that are multiples of 64.
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=3 * _TEXT_WIDTH,  # three stacked hidden-state layers
            timestep_guidance_channels=256,
            axes_dims_rope=(8, 8, 8, 8),  # (T, H, W, L) position axes; must sum to attention_head_dim
            guidance_embeds=guidance_embeds,
        )


def _save_flux2(path, pipeline_class, write_tokenizer, text_encoder, guidance_embeds, sample_size, seed):
    tokenizer = _in_scratch_dir(write_tokenizer)
    pipe = pipeline_class(
        # FLUX.2's published scheduler config: a dynamic, resolution-dependent shift passed as `mu` at inference.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
        ),
        vae=_flux2_vae(seed, sample_size),
        text_encoder=text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        transformer=_flux2_transformer(seed + 2, guidance_embeds),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


@tiny_builder("Flux2Pipeline")
def make_flux2_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny guidance-distilled `Flux2Pipeline` (FLUX.2 [dev]); returns its path."""
    return _save_flux2(path, Flux2Pipeline, write_mistral_tokenizer, _mistral3_encoder, True, sample_size, seed)


@tiny_builder("Flux2KleinPipeline")
def make_flux2_klein_pipeline(path, sample_size=32, seed=0):
    """Build and save a tiny `Flux2KleinPipeline` (FLUX.2 [klein], no guidance embedding); returns its path."""
    return _save_flux2(path, Flux2KleinPipeline, write_qwen_tokenizer, _qwen3_encoder, False, sample_size, seed)
