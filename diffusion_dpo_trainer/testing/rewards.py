"""Tiny random reward models in the layouts of the real checkpoints, saved to disk, so tests run the real loading
and scoring code of `rewards/` offline:

- `make_hps_model`: an open_clip ViT CLIP state dict saved like `HPS_v2.1_compressed.pt` (`{"state_dict": ...}`),
  next to a directory with the matching transformers `CLIPConfig` and CLIP tokenizer;
- `make_imagereward_model`: an `ImageReward.pt`-layout state dict (BLIP ViT + BERT with cross-attention + MLP) and a
  BERT tokenizer with ImageReward's added tokens;
- `make_aesthetic_model`: a tiny CLIP model directory plus a `sac+logos+ava1-l14-linearMSE.pth`-layout MLP head.
"""

from pathlib import Path

import torch
from transformers import BertTokenizer, CLIPConfig

from .common import _seeded, write_clip_tokenizer
from .fixtures import make_clip_model

OPEN_CLIP_TINY = {"width": 32, "layers": 2, "heads": 2, "patch_size": 8, "image_size": 32, "text_width": 32,
                  "text_layers": 2, "text_heads": 2, "embed_dim": 16}
BERT_WORDS = ["a", "an", "the", "of", "photo", "painting", "cat", "dog", "red", "blue", "square", "circle", "on",
              "in", "with", "##s", "##ing"]


def _layer_norm(gen, width):
    return {"weight": 1 + 0.1 * torch.randn(width, generator=gen), "bias": 0.1 * torch.randn(width, generator=gen)}


def _resblocks(gen, prefix, width, layers, std=0.2):
    state = {}
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        for name, shape in (("attn.in_proj_weight", (3 * width, width)), ("attn.in_proj_bias", (3 * width,)),
                            ("attn.out_proj.weight", (width, width)), ("attn.out_proj.bias", (width,)),
                            ("mlp.c_fc.weight", (4 * width, width)), ("mlp.c_fc.bias", (4 * width,)),
                            ("mlp.c_proj.weight", (width, 4 * width)), ("mlp.c_proj.bias", (width,))):
            state[block + name] = std * torch.randn(shape, generator=gen)
        for norm in ("ln_1", "ln_2"):
            state.update({f"{block}{norm}.{k}": v for k, v in _layer_norm(gen, width).items()})
    return state


def make_hps_model(path, seed=0, **sizes) -> tuple[str, str]:
    """A random open_clip-layout CLIP checkpoint (`path/HPS_v2.1_compressed.pt`) and its config/tokenizer directory
    (`path/clip`). Returns `(checkpoint, clip_dir)` for `HPSv2(checkpoint, clip=clip_dir)`."""
    s = {**OPEN_CLIP_TINY, **sizes}
    path = Path(path)
    tokenizer = write_clip_tokenizer(path / "clip")
    context, vocab, width, text_width = 77, len(tokenizer), s["width"], s["text_width"]
    grid = s["image_size"] // s["patch_size"]
    gen = torch.Generator().manual_seed(seed)
    state = {
        "visual.class_embedding": 0.5 * torch.randn(width, generator=gen),
        "visual.positional_embedding": 0.5 * torch.randn(grid * grid + 1, width, generator=gen),
        "visual.conv1.weight": 0.2 * torch.randn(width, 3, s["patch_size"], s["patch_size"], generator=gen),
        "visual.proj": 0.2 * torch.randn(width, s["embed_dim"], generator=gen),
        "token_embedding.weight": 0.5 * torch.randn(vocab, text_width, generator=gen),
        "positional_embedding": 0.5 * torch.randn(context, text_width, generator=gen),
        "text_projection": 0.2 * torch.randn(text_width, s["embed_dim"], generator=gen),
        "logit_scale": torch.tensor(4.6052),
    }
    for prefix, width_ in (("visual.ln_pre.", width), ("visual.ln_post.", width), ("ln_final.", text_width)):
        state.update({prefix + k: v for k, v in _layer_norm(gen, width_).items()})
    state.update(_resblocks(gen, "visual.", width, s["layers"]))
    state.update(_resblocks(gen, "", text_width, s["text_layers"]))
    config = CLIPConfig(
        projection_dim=s["embed_dim"],
        vision_config={"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": s["layers"],
                       "num_attention_heads": s["heads"], "image_size": s["image_size"],
                       "patch_size": s["patch_size"], "hidden_act": "gelu", "projection_dim": s["embed_dim"]},
        text_config={"vocab_size": vocab, "hidden_size": text_width, "intermediate_size": 4 * text_width,
                     "num_hidden_layers": s["text_layers"], "num_attention_heads": s["text_heads"],
                     "max_position_embeddings": context, "hidden_act": "gelu", "projection_dim": s["embed_dim"],
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
    )
    config.save_pretrained(path / "clip")
    checkpoint = path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, checkpoint)  # half, as the real files
    return str(checkpoint), str(path / "clip")


# transformers' BLIP vision names -> BLIP/timm ViT names (the layout of ImageReward.pt)
_BLIP_VISION = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
                "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
                "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
_BLIP_BLOCK = (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
               ("self_attn.projection", "attn.proj"))
IMAGEREWARD_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "image_size": 32, "patch_size": 16}
IMAGEREWARD_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "max_position_embeddings": 40, "encoder_hidden_size": 32}


def make_imagereward_model(path, seed=0) -> tuple[str, str, dict, dict]:
    """A random `ImageReward.pt`-layout checkpoint and a BERT tokenizer directory with `[DEC]`/`[ENC]` added.

    Returns `(checkpoint, tokenizer_dir, vision_config, text_config)`: the keyword arguments of `ImageReward`.
    """
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from ..rewards.aesthetic import aesthetic_head

    path = Path(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as ImageReward's BLIP init_tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(path / "tokenizer")
    text_config = {**IMAGEREWARD_TINY_TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id}
    with _seeded(seed):
        vision = BlipVisionModel(BlipVisionConfig(**IMAGEREWARD_TINY_VISION, layer_norm_eps=1e-6))
        text = BlipTextModel(BlipTextConfig(**text_config), add_pooling_layer=False)
        mlp = aesthetic_head(text_config["hidden_size"])
        for module in (vision, text):  # std 0.02 init leaves every score ~equal: spread the weights out
            for param in module.parameters():
                if param.dim() > 1:
                    param.data.normal_(std=0.2)
    state = {}
    for key, value in vision.state_dict().items():
        if key.startswith("encoder.layers."):
            key = "blocks." + key.removeprefix("encoder.layers.")
            for ours, theirs in _BLIP_BLOCK:
                key = key.replace(f".{ours}.", f".{theirs}.")
        state["blip.visual_encoder." + _BLIP_VISION.get(key, key)] = value
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    state.update({"mlp.layers." + k: v for k, v in mlp.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.zeros(4, IMAGEREWARD_TINY_VISION["hidden_size"])  # an unused BLIP head
    checkpoint = path / "ImageReward.pt"
    torch.save(state, checkpoint)
    return str(checkpoint), str(path / "tokenizer"), IMAGEREWARD_TINY_VISION, text_config


def make_aesthetic_model(path, seed=0) -> tuple[str, str]:
    """A tiny CLIP model directory and a random aesthetic head `.pth`; returns `(head, clip_dir)`."""
    from ..rewards.aesthetic import AESTHETIC_FILE, aesthetic_head

    path = Path(path)
    clip_dir = make_clip_model(path / "clip", seed=seed)
    with _seeded(seed):
        head = aesthetic_head(CLIPConfig.from_pretrained(clip_dir).projection_dim)
    torch.save({"layers." + k: v for k, v in head.state_dict().items()}, path / AESTHETIC_FILE)
    return str(path / AESTHETIC_FILE), clip_dir
