"""Human Preference Score v2 / v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2) on transformers' CLIPModel.

HPS v2 and v2.1 are OpenCLIP ViT-H-14 models (laion2B-s32B-b79K) fine-tuned on human preferences; the checkpoints
`HPS_v2_compressed.pt` and `HPS_v2.1_compressed.pt` on the Hub repository `xswu/HPSv2` hold open_clip state dicts.
The score is the cosine similarity of the image and prompt embeddings (no temperature, no x100: HPSv2's
`img_score.py`), so typical values are about 0.2-0.35.

open_clip imports torchvision (and timm) unconditionally, and torchvision must match the installed torch build;
transformers' `CLIPModel` is the same architecture, so the open_clip weights are converted to it here
(`open_clip_to_transformers`) and the library needs neither. The architecture config and the tokenizer come from
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (the HF export of the same base model). Prompts are cleaned as open_clip's
tokenizer does (ftfy, HTML unescaping, whitespace, lower case: the `rewards` extra installs ftfy); images are
preprocessed as HPSv2's evaluation transform (`resize_longest_pad` to 224, OpenAI CLIP mean/std).
"""

import html
import re

import torch
from accelerate import init_empty_weights
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from .base import ModelReward, checkpoint_file, load_torch_checkpoint, normalize, require, resize_longest_pad, to_tensor

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
OPEN_CLIP_VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Buffers open_clip may save that transformers rebuilds itself.
IGNORED_KEYS = {"attn_mask", "visual.attn_mask"}


def _tower(state: dict, prefix: str, target: str, layers: int) -> dict:
    """One open_clip transformer (resblocks with a fused in_proj) as transformers' CLIPEncoder layers."""
    out = {}
    for i in range(layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"{target}encoder.layers.{i}."
        q, k, v = state[f"{src}attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[f"{src}attn.in_proj_bias"].chunk(3)
        out.update({
            f"{dst}self_attn.q_proj.weight": q, f"{dst}self_attn.k_proj.weight": k, f"{dst}self_attn.v_proj.weight": v,
            f"{dst}self_attn.q_proj.bias": qb, f"{dst}self_attn.k_proj.bias": kb, f"{dst}self_attn.v_proj.bias": vb,
        })
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                out[f"{dst}{ours}.{kind}"] = state[f"{src}{theirs}.{kind}"]
    return out


def open_clip_to_transformers(state: dict) -> dict:
    """An open_clip `CLIP` (ViT image tower, default text tower) state dict in transformers' `CLIPModel` names.

    Raises if a key would be left over: a checkpoint of another architecture must not load half-way.
    """
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    def count(prefix):
        blocks = prefix + "transformer.resblocks."
        return len({k.removeprefix(blocks).split(".")[0] for k in state if k.startswith(blocks)})

    vision_layers, text_layers = count("visual."), count("")
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"],
    }
    out.update(_tower(state, "visual.", "vision_model.", vision_layers))
    out.update(_tower(state, "", "text_model.", text_layers))
    used = 14 + 12 * (vision_layers + text_layers)
    if used != len(state):
        raise ValueError(f"The checkpoint has {len(state) - used} keys that an open_clip ViT CLIP does not have; "
                         "expected an HPSv2 (open_clip ViT-H-14) checkpoint.")
    return {key: value.contiguous() for key, value in out.items()}


def open_clip_clean(text: str) -> str:
    """open_clip's `basic_clean` + `whitespace_clean` + lower case, applied before its BPE."""
    ftfy = require("ftfy", "HPSv2")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class HPSv2(ModelReward):
    """HPS v2 or v2.1: cos(image, prompt) under the HPS-tuned OpenCLIP ViT-H-14.

    Args:
        checkpoint: a local `.pt` file, or a Hub repository holding `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`.
        version: "2.0" or "2.1" (which file to take from a repository).
        clip: hub id or local directory with the CLIP config and tokenizer of the architecture
            (default `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
        device, dtype, batch_size: where, in which precision and how many images per forward pass.
    """

    def __init__(self, checkpoint: str | None = None, version: str = "2.1", clip: str = OPEN_CLIP_VIT_H_14,
                 device=None, dtype=None, batch_size: int = 16):
        if version not in HPS_FILES:
            raise ValueError(f"Unknown HPS version {version!r}; expected one of {sorted(HPS_FILES)}.")
        require("ftfy", "HPSv2")
        config = CLIPConfig.from_pretrained(clip)
        state = open_clip_to_transformers(load_torch_checkpoint(checkpoint_file(checkpoint or HPS_REPO,
                                                                                HPS_FILES[version])))
        with init_empty_weights():  # no random init of a 1B-parameter model that is overwritten at once
            self.model = CLIPModel(config)
        try:
            self.model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # shapes that do not match the `clip` config
            raise ValueError(f"{checkpoint or HPS_REPO} does not fit the CLIP architecture of {clip!r}: {exc}") from exc
        self._place(device, dtype or torch.float32)  # the "compressed" checkpoints are half precision
        self.tokenizer = AutoTokenizer.from_pretrained(clip)
        self.image_size = config.vision_config.image_size
        self.batch_size = batch_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return normalize(resize_longest_pad(to_tensor(image), self.image_size))

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        text = self.tokenizer([open_clip_clean(p) for p in prompts], padding="max_length", truncation=True,
                              max_length=self.model.config.text_config.max_position_embeddings,
                              return_tensors="pt").to(self.device)
        output = self.model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
        return (output.image_embeds * output.text_embeds).sum(dim=-1)  # both normalised by the forward pass
