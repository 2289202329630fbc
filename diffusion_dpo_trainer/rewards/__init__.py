"""Reward functions: `reward_fn(images: list[PIL.Image], prompts: list[str]) -> list[float]`, higher is better.

Any callable with that signature labels AI-feedback pairs (`feedback.py`), judges win rates and drives the
evaluation protocol (`evaluation.py`, `protocol.py`). `load_reward` builds the ones papers report by name:

| name | model | score |
|---|---|---|
| `pickscore` | `yuvalkirstain/PickScore_v1` | `logit_scale.exp()` x cosine (about 18-23) |
| `hpsv2`, `hpsv2.1` | `xswu/HPSv2` on OpenCLIP ViT-H-14 | cosine (about 0.2-0.35) |
| `imagereward` | `THUDM/ImageReward` (BLIP) | normalised MLP output (about -2..2) |
| `ocr` | PP-OCRv4 (ONNX, in `rapidocr-onnxruntime`) | 1 - edit distance to the prompt's quoted text (0-1) |
| `geneval`, `geneval-partial` | Mask2Former over HTTP (`geneval:http://host:port/path`) | GenEval rules: 0/1, partial |
| `aesthetic` | LAION improved aesthetic predictor on CLIP ViT-L/14 | AVA scale (about 1-10) |
| `clip` | `openai/clip-vit-large-patch14` | 100 x cosine |
| `hpsv3` | `MizzenAI/HPSv3` (Qwen2-VL-7B + reward head) | the head's predicted mean (unbounded) |
| `unifiedreward` | `CodeGoat24/UnifiedReward-2.0-qwen-7b` (a VLM judge; `:<id>` for another) | mean of its 1-5 axes |

The model classes import their weights lazily, so `import diffusion_dpo_trainer` stays light. For video pipelines
the samples are videos (lists of PIL frames): any callable on lists of frames works, and `frame_averaged` turns an
image reward into a video reward.
"""

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise

import numpy as np
from PIL import Image

from .base import check_inputs
from .clip import CLIPScore, PickScore
from .scoring import reward_name, score_images, unique_names

RewardFn = Callable[[list[Image.Image], list[str]], Sequence[float]]

# name -> (module, class, fixed keyword arguments, keyword that receives the text after "name:")
REWARDS = {
    "clip": (".clip", "CLIPScore", {}, "model"),
    "clip-score": (".clip", "CLIPScore", {}, "model"),
    "ocr": (".ocr", "OCRReward", {}, "text_score"),
    "geneval": (".geneval", "GenEvalReward", {"score": "strict"}, "url"),
    "geneval-partial": (".geneval", "GenEvalReward", {"score": "partial"}, "url"),
    "pickscore": (".clip", "PickScore", {}, "model"),
    "hpsv2": (".hps", "HPSv2", {"version": "2.0"}, "checkpoint"),
    "hpsv2.1": (".hps", "HPSv2", {"version": "2.1"}, "checkpoint"),
    "imagereward": (".imagereward", "ImageReward", {}, "checkpoint"),
    "aesthetic": (".aesthetic", "AestheticScore", {}, "head"),
    "hpsv3": (".hpsv3", "HPSv3", {}, "checkpoint"),
    "unifiedreward": (".unifiedreward", "UnifiedReward", {}, "model"),
}


class WeightedReward:
    """`sum_i weight_i * reward_i(images, prompts)`: several rewards as one (e.g. PickScore + 0.5 HPSv2.1).

    The components keep their own scales (PickScore ~20, HPS ~0.3): choose weights with that in mind. Scored through
    `scoring.score_images` (the checks every caller shares); an image no component scored gets None.
    """

    def __init__(self, rewards: Sequence[tuple[RewardFn, float]], names: Sequence[str] | None = None):
        if not rewards:
            raise ValueError("A weighted reward needs at least one component.")
        self.rewards = list(rewards)
        self.names = list(names) if names is not None else [reward_name(r) for r, _ in rewards]

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float | None]:
        check_inputs(images, prompts)
        functions, weights = zip(*self.rewards, strict=True)
        total = score_images(functions, images, prompts, unique_names(self.names), weights).total
        return [None if math.isnan(value) else value for value in total.tolist()]


def _weight(text: str) -> float | None:
    """The weight in `name:weight`, or None when the tail is no finite number: `module:nan` or `module:inf` name a
    function (float() would read them as weights)."""
    try:
        weight = float(text)
    except ValueError:
        return None
    return weight if math.isfinite(weight) else None


def _components(spec) -> list[tuple[object, float]]:
    """`"a:1.0,b:0.5"`, `{"a": 1.0}`, `[("a", 1.0), "b", reward_fn]` -> [(name or callable, weight)]."""
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                raise ValueError(f"Empty component in reward {spec!r}; expected 'name:weight,name:weight'.")
            name, _, tail = part.rpartition(":")
            weight = _weight(tail) if name else None
            items.append((name, weight) if weight is not None else (part, 1.0))
        return items
    if isinstance(spec, Mapping):
        return [(name, float(weight)) for name, weight in spec.items()]
    return [(item[0], float(item[1])) if isinstance(item, tuple) else (item, 1.0) for item in spec]


def is_weighted(spec) -> bool:
    if isinstance(spec, str):
        return "," in spec or (":" in spec and _weight(spec.rpartition(":")[2]) is not None)
    return isinstance(spec, (Mapping, list, tuple))


def load_reward(name, **kwargs) -> RewardFn:
    """A reward function from a name, as a command line gives it.

    - a callable is returned as is;
    - a name of the table above (`"pickscore"`, `"hpsv2.1"`, `"imagereward"`, `"aesthetic"`, `"clip"`): its
      default model; `"<name>:<id or path>"`: that model or checkpoint instead (e.g.
      `"clip:openai/clip-vit-base-patch32"`, `"hpsv2.1:/ckpt/HPS_v2.1_compressed.pt"`);
    - `"http://host:port/path"` (or https): a reward server (`rewards.http`);
    - `"package.module:function"`: any importable reward function (or class, instantiated with `kwargs`);
    - a weighted sum: `"pickscore:1.0,hpsv2.1:0.5"`, `{"pickscore": 1.0, "hpsv2.1": 0.5}` or
      `[("pickscore", 1.0), (my_reward_fn, 0.5)]`.

    `kwargs` go to the reward's constructor (`device`, `dtype`, `batch_size`, ...); for a weighted sum, to each part.
    """
    if callable(name):
        return name
    if is_weighted(name):
        components = _components(name)
        return WeightedReward([(load_reward(part, **kwargs), weight) for part, weight in components],
                              [reward_name(part) for part, _ in components])
    if not isinstance(name, str):
        raise TypeError(f"Expected a reward name, a callable or a weighted list, got {type(name).__name__}.")
    if name.startswith(("http://", "https://")):
        from .http import HTTPReward

        return HTTPReward(name, **kwargs)
    kind, _, target = name.partition(":")
    if kind.lower() in REWARDS:
        module, cls, fixed, argument = REWARDS[kind.lower()]
        reward_cls = getattr(importlib.import_module(module, __name__), cls)
        return reward_cls(**fixed, **({argument: target} if target else {}), **kwargs)
    if target:
        try:
            obj = getattr(importlib.import_module(kind), target)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"Could not import reward {name!r}: {exc}") from exc
        return obj(**kwargs) if isinstance(obj, type) else obj
    raise ValueError(
        f"Unknown reward {name!r}; expected one of {sorted(REWARDS)}, '<name>:<model id or path>', "
        "'http://host:port/path', 'package.module:function' or weights such as 'pickscore:1.0,hpsv2.1:0.5'."
    )


def frame_averaged(image_reward: RewardFn | str, num_frames: int = 4) -> RewardFn:
    """A video reward from an image reward: per video (a list of frames, as video pipelines such as Wan return), the
    mean of the image reward on `num_frames` frames spread evenly over it (first and last included; every frame of a
    shorter video). All frames of a batch are scored in one call of `image_reward` (a callable or a `load_reward`
    name)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    image_reward = load_reward(image_reward)

    def reward(videos: list[list[Image.Image]], prompts: list[str]) -> list[float]:
        picked = [[video[i] for i in np.linspace(0, len(video) - 1, min(num_frames, len(video))).round().astype(int)]
                  for video in videos]
        scores = [float(s) for s in image_reward([f for frames in picked for f in frames],
                                                 [p for p, frames in zip(prompts, picked) for _ in frames])]
        bounds = np.cumsum([0] + [len(frames) for frames in picked])
        return [float(np.mean(scores[a:b])) for a, b in pairwise(bounds)]

    return reward


__all__ = ["REWARDS", "CLIPScore", "PickScore", "RewardFn", "WeightedReward", "frame_averaged", "load_reward"]
