"""Shared parts of the tiny builders: tokenizers written from a small vocabulary, tiny text encoders, VAEs and
UNets, and the constants every builder relies on."""

import contextlib
import json
import string
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
)
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


def _learn_bpe_merges(words):
    """Minimal deterministic BPE training: merge the most frequent adjacent pair (ties broken
    lexicographically) until every word is one symbol. Training words then encode as single
    tokens, which naive per-word merge chains do not guarantee once words share substrings.
    (The `tokenizers` trainer breaks ties in hash order, so its merges vary between processes.)
    """
    segmented = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
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


