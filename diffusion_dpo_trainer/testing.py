"""Tiny, randomly initialised, fully offline diffusers pipelines for tests.

Tests must exercise the real loading code (``DiffusionPipeline.from_pretrained``)
without network access, so every builder here constructs the smallest models
that still satisfy the shape contracts of the corresponding diffusers
pipeline, then writes them with ``save_pretrained``.

``sample_size`` arguments are pixel resolutions: each denoiser's config
``sample_size`` is set to ``sample_size // 2`` (all VAEs downsample 2x) so the
pipeline's default height/width equals ``sample_size``. FLUX is the exception:
its pipeline hard-codes the default resolution, so always pass height/width.
Any multiple of 4 px works for every pipeline (SD3 up to 128 px, the extent
of its positional-embedding table).
"""

import contextlib
import json
import string
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

_WORDS = (
    "a an the of in on with and photo picture image painting drawing cat dog "
    "bird red blue green yellow orange purple pink white black grey gray brown "
    "digit handwritten number solid colour color noise random square circle "
    "background texture plain simple"
).split()

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512

# Two resolution levels, i.e. vae_scale_factor == 2 in every pipeline.
_VAE_BLOCKS = (16, 32)
_VAE_SCALE_FACTOR = 2 ** (len(_VAE_BLOCKS) - 1)

# Stable Diffusion's training noise schedule, shared by the SD and SDXL schedulers.
_SD_BETAS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)

_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}


@contextlib.contextmanager
def _seeded(seed):
    """Seed torch for one component without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_level_alphabet():
    """The 256 symbols of GPT-2/CLIP byte-level BPE: printable Latin-1 bytes stand for
    themselves, the remaining bytes are shifted to code points from 256 upwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(256 - len(printable))]


def _learn_bpe_merges(words, end_of_word="</w>"):
    """Minimal deterministic BPE training: merge the most frequent adjacent pair (ties broken
    lexicographically) until every word is one symbol. Training words then encode as single
    tokens, which naive per-word merge chains do not guarantee once words share substrings.
    (The `tokenizers` trainer breaks ties in hash order, so its merges vary between processes.)
    `end_of_word` marks a word's last symbol (CLIP's "</w>"; GPT-2-style byte-level BPE has none).
    """
    segmented = [list(w[:-1]) + [w[-1] + end_of_word] for w in dict.fromkeys(words)]
    merges = []
    while True:
        counts = Counter(pair for seg in segmented for pair in pairwise(seg))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmented = [_apply_merge(seg, best) for seg in segmented]


def _apply_merge(symbols, pair):
    merged, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i : i + 2]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def write_clip_tokenizer(path, vocab_words=None):
    """Write a byte-level BPE CLIP tokenizer (vocab.json + merges.txt) to ``path`` and load it back.

    All 256 byte-level symbols are tokens, both word-internal and with the
    ``</w>`` end-of-word marker, so any UTF-8 prompt tokenizes without hitting
    the unk token (which for CLIP is ``<|endoftext|>`` and would corrupt pooling).
    ``vocab_words`` additionally get merges so they encode as single tokens;
    they must be ASCII letters only because CLIP's pre-tokenizer splits letters
    from digits and punctuation.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = [w.lower() for w in (_WORDS if vocab_words is None else vocab_words)]
    bad = [w for w in words if not (w.isascii() and w.isalpha())]
    if bad:
        raise ValueError(f"vocab_words must be ASCII letters only, got {bad}")

    chars = _byte_level_alphabet()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    merges = _learn_bpe_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in (_CLIP_BOS, _CLIP_EOS):
        vocab[token] = len(vocab)

    # A tokenizer.json left by an earlier call would take precedence over the new files.
    (path / "tokenizer.json").unlink(missing_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=_CLIP_MAX_LENGTH)
    # Persist model_max_length so later loads from `path` agree with this object.
    tokenizer.save_pretrained(path)
    return tokenizer


def write_t5_tokenizer(path):
    """Write a tiny Unigram (sentencepiece-style) T5 tokenizer to ``path`` and load it back.

    Letters, digits and punctuation are always pieces, so any ASCII text
    tokenizes; other characters become ``<unk>``. Whole words score higher
    than their spelled-out characters, so known words stay whole.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # T5's fixed ids: <pad>=0, </s>=1, <unk>=2. "\u2581" is sentencepiece's word-start marker.
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -6.0) for c in chars]
    pieces += [("\u2581" + c, -6.0) for c in chars]
    pieces += [("\u2581" + w, -4.0) for w in _WORDS]
    T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_LENGTH).save_pretrained(path)
    return T5Tokenizer.from_pretrained(path)


def _in_scratch_dir(write_tokenizer):
    """Build a tokenizer in a throwaway directory: pipelines re-save tokenizers into their own subfolders."""
    with tempfile.TemporaryDirectory() as scratch:
        return write_tokenizer(scratch)


def _clip_text_encoder(tokenizer, seed, with_projection=False, hidden_size=32):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="gelu",
        # Pooling picks the first eos position, so these must match the tokenizer.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        return model_cls(config).eval()


def _t5_encoder(tokenizer, seed, d_model):
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def _vae(seed, sample_size, latent_channels, scaling_factor, shift_factor=None):
    """Two-level AutoencoderKL; SD3/FLUX-style VAEs (with a shift) drop the quant convs like the real ones."""
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
            block_out_channels=_VAE_BLOCKS,
            layers_per_block=1,
            norm_num_groups=_VAE_BLOCKS[0],
            latent_channels=latent_channels,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=shift_factor is None,
            use_post_quant_conv=shift_factor is None,
        )


def _unet(seed, sample_size, cross_attention_dim, **sdxl_kwargs):
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=sample_size // _VAE_SCALE_FACTOR,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # Despite its name this is the number of heads per block.
            attention_head_dim=(2, 4),
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=8,
            **sdxl_kwargs,
        )


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


def make_preference_dataset(n=8, size=32, seed=0):
    """Toy preference data: ``chosen`` is a solid colour matching the prompt, ``rejected`` is uniform noise.

    The two classes are trivially separable, so a working DPO loop should
    quickly learn to prefer the chosen images.
    """
    rng = np.random.default_rng(seed)
    names = list(_COLOURS)
    prompts, chosen, rejected = [], [], []
    for i in range(n):
        name = names[i % len(names)]
        prompts.append(f"a solid {name} square")
        chosen.append(Image.new("RGB", (size, size), _COLOURS[name]))
        noise = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        rejected.append(Image.fromarray(noise))
    features = Features({"prompt": Value("string"), "chosen": ImageFeature(), "rejected": ImageFeature()})
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}, features=features)


def make_clip_model(path, image_size=32, seed=0):
    """Build and save a tiny random CLIPModel with its processor (CLIP tokenizer + PIL image processor).

    Loads with `CLIPModel.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)` like
    openai/clip-vit-large-patch14 or PickScore, so reward wrappers run their real loading code.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = write_clip_tokenizer(path)
    text_config = _clip_text_encoder(tokenizer, seed).config.to_dict()
    vision_config = dict(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=32,
    )
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)
