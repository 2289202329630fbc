"""Tiny random reward models in the layouts of the real checkpoints, saved to disk, so tests run the real loading
and scoring code of `rewards/` offline:

- `make_hps_model`: an open_clip ViT CLIP state dict saved like `HPS_v2.1_compressed.pt` (`{"state_dict": ...}`),
  next to a directory with the matching transformers `CLIPConfig` and CLIP tokenizer;
- `make_imagereward_model`: an `ImageReward.pt`-layout state dict (BLIP ViT + BERT with cross-attention + MLP) and a
  BERT tokenizer with ImageReward's added tokens;
- `make_aesthetic_model`: a tiny CLIP model directory plus a `sac+logos+ava1-l14-linearMSE.pth`-layout MLP head;
- `make_hpsv3_model`: an `HPSv3.safetensors`-layout state dict (transformers 4.45 Qwen2-VL names plus the reward
  head) and a tiny Qwen2-VL base directory (config, tokenizer with the chat template, image-processor config);
- `make_unifiedreward_model`: a tiny Qwen2.5-VL or Qwen3-VL judge saved as a UnifiedReward-2.0 repository is.

The Qwen-VL tokenizers are byte-level BPE tokenizers written from a small vocabulary; the image-processor configs
are the published models' and so is Qwen2-VL's chat template (Qwen3-VL's is a minimal stand-in rendering the same
single-image turn).
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


# Qwen2-VL-Instruct's (and Qwen2.5-VL-Instruct's) chat template: a default system turn, `<|vision_start|><|image_pad|>
# <|vision_end|>` for an image, the assistant's turn opened on request.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's template renders the same turn without a default system turn (a stand-in for its full template,
# which adds only tool-call and thinking markup that a judge's prompt does not use).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The published preprocessor_config.json of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (Qwen3-VL:
# 16 px patches, mean = std = 0.5); tests pin these.
QWEN2_VL_PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
                         "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                         "image_mean": [0.48145466, 0.4578275, 0.40821073],
                         "image_std": [0.26862954, 0.26130258, 0.27577711], "do_rescale": True,
                         "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True, "do_convert_rgb": True}
QWEN3_VL_PREPROCESSOR = {**{k: v for k, v in QWEN2_VL_PREPROCESSOR.items() if k not in ("min_pixels", "max_pixels")},
                         "patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                         "size": {"shortest_edge": 65536, "longest_edge": 16777216}}
VLM_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Words of the judges' prompts and answers, so a tiny tokenizer keeps them short.
VLM_WORDS = ["Alignment", "Coherence", "Style", "Score", "Final", "image", "caption", "Text", "Caption", "rating",
             "You", "are", "system", "user", "assistant", "helpful", "Please", "provide", "overall", "ratings", "this"]


def _write_qwen_vl_processor_files(path, chat_template, preprocessor):
    """A Qwen2 byte-level tokenizer with Qwen-VL's vision tokens and `chat_template`, and a `preprocessor_config.json`
    as the published checkpoints have; returns the tokenizer."""
    import json

    from transformers import AddedToken, Qwen2Tokenizer

    from .qwenimage import write_qwen2_tokenizer

    path = Path(path)
    tokenizer = write_qwen2_tokenizer(path)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in VLM_SPECIAL_TOKENS])
    tokenizer.add_tokens(VLM_WORDS)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return Qwen2Tokenizer.from_pretrained(path)


def _spread(module, std=0.2):
    for param in module.parameters():  # the default std 0.02 leaves every score about equal
        if param.dim() > 1:
            param.data.normal_(std=std)


def _tiny_qwen_vl_config(kind, tokenizer, vocab_size):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {"image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
           "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
           "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
           "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>")}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": vocab_size, "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id}
    if kind == "qwen3_vl":
        text.update(head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                              "mrope_interleaved": True})
        vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                  "patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    text["rope_scaling"] = {"rope_type": "default", "type": "default", "mrope_section": [1, 1, 2]}
    if kind == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2}
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
              "fullatt_block_indexes": [1], "window_size": 56}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def make_hpsv3_model(path, seed=0) -> tuple[str, str]:
    """A random `HPSv3.safetensors` in the published layout (transformers 4.45 names: `visual.*`, `model.*`,
    `lm_head.weight`, `rm_head.{0,3,5}.*`; input embeddings resized to the tokenizer plus `<|Reward|>`, while the base
    config's vocabulary is larger, as Qwen2-VL-7B's 152064 rows against its 151657 tokens) and a tiny base directory
    (Qwen2-VL config, tokenizer with Qwen2-VL's chat template, the published image-processor config).

    Returns `(checkpoint, base_dir)` for `HPSv3(checkpoint, base=base_dir)`.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2VLModel

    from ..rewards.hpsv3 import reward_head

    path = Path(path)
    base = path / "base"
    tokenizer = _write_qwen_vl_processor_files(base, QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_PREPROCESSOR)
    config = _tiny_qwen_vl_config("qwen2_vl", tokenizer, vocab_size=len(tokenizer) + 64)
    config.save_pretrained(base)
    config.text_config.vocab_size = len(tokenizer) + 1  # + <|Reward|>, as the reference's resize_token_embeddings
    with _seeded(seed):
        model, head = Qwen2VLModel(config), reward_head(config.text_config.hidden_size)
        _spread(model)
        _spread(head, std=0.5)
        lm_head = torch.randn(config.text_config.vocab_size, config.text_config.hidden_size)
    state = {("visual." + k.removeprefix("visual.")) if k.startswith("visual.") else
             "model." + k.removeprefix("language_model."): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    state.update({"rm_head." + k: v for k, v in head.state_dict().items()})  # float32, as the reference keeps it
    state["lm_head.weight"] = lm_head.to(torch.bfloat16)
    save_file(state, path / "HPSv3.safetensors")
    return str(path / "HPSv3.safetensors"), str(base)


def make_unifiedreward_model(path, kind="qwen2_5_vl", seed=0) -> str:
    """A tiny random judge in a UnifiedReward-2.0 repository's layout: a `Qwen2_5_VLForConditionalGeneration`
    (`kind="qwen2_5_vl"`, the `UnifiedReward-2.0-qwen-*` models) or `Qwen3VLForConditionalGeneration`
    (`kind="qwen3_vl"`, `UnifiedReward-2.0-qwen3vl-*`) saved with `save_pretrained`, with its tokenizer, chat
    template and image-processor config. Returns the directory."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    qwen3 = kind == "qwen3_vl"
    tokenizer = _write_qwen_vl_processor_files(path, QWEN3_VL_CHAT_TEMPLATE if qwen3 else QWEN2_VL_CHAT_TEMPLATE,
                                               QWEN3_VL_PREPROCESSOR if qwen3 else QWEN2_VL_PREPROCESSOR)
    config = _tiny_qwen_vl_config(kind, tokenizer, vocab_size=len(tokenizer))
    with _seeded(seed):
        model = AutoModelForImageTextToText.from_config(config)
        _spread(model)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return str(path)
