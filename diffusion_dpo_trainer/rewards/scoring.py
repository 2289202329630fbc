"""The one way rewards are called and checked: AI-feedback pairs, win rates, the evaluation protocol, weighted sums
and the on-policy trainers all score images through `score_images`.

A reward function is called TRL's way, `fn(prompts=..., completions=images, **columns)`, when it takes `completions`
(or only `**kwargs`), and otherwise as `fn(images, prompts)`. It returns one score per image: a number, or None for an
image it does not score (TRL's convention). Anything else is an error that names the reward, the image and its
prompt, because a wrong score silently becomes a wrong preference: a NaN would tie every comparison it enters.
"""

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def reward_name(fn) -> str:
    """A reward's name for messages and metric keys: the name it was loaded by, or its function or class name."""
    if isinstance(fn, str):
        return fn
    return getattr(fn, "__name__", type(fn).__name__)


def unique_names(names: Sequence[str]) -> list[str]:
    """Reward names as metric keys: a repeated name gets its position appended."""
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def takes_trl_keywords(fn) -> bool:
    """TRL's convention (`prompts=`, `completions=`, dataset columns as keywords) or ours (`fn(images, prompts)`)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in parameters}
    return "completions" in names or all(p.kind is p.VAR_KEYWORD for p in parameters)


class NotAScoreError(TypeError, ValueError):
    """A reward returned something that is not a number: a TypeError to Python, and a bad value of the user's reward
    (ValueError) to the command line, which reports it in one line instead of a traceback."""


@dataclass(frozen=True)
class ScoreNaming:
    """How `check_scores`' errors name the reward, its values and an image (`image.format(index)`): the trainers'
    words by default; the reward server names its JSON fields (`SERVER_NAMING` in http.py)."""

    reward: str = "Reward function"
    values: str = "values"
    image: str = "image {}"


def check_scores(values, prompts: Sequence[str], name: str, allow_none: bool = True, offset: int = 0,
                 naming: ScoreNaming = ScoreNaming()) -> list[float]:
    """One finite float per image (NaN for None where `allow_none`); `offset` is the first image's index in the run,
    so an error names the image as the caller counts it."""
    values, reward = list(values), f"{naming.reward} {name!r}"
    if len(values) != len(prompts):
        raise ValueError(f"{reward} returned {len(values)} {naming.values} for {len(prompts)} images; expected "
                         "one per image" + (" (None for an image it does not score)." if allow_none else "."))
    checked = []
    for i, value in enumerate(values):
        where = f"{naming.image.format(offset + i)} (prompt {prompts[i]!r})"
        if value is None:
            if not allow_none:
                raise ValueError(f"{reward} returned None for {where}; every image must be scored here.")
            checked.append(math.nan)
            continue
        if isinstance(value, torch.Tensor | np.ndarray) and np.ndim(value) == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise NotAScoreError(f"{reward} returned {value!r} ({type(value).__name__}) for {where}; expected a "
                                 "number" + (", or None to skip the image." if allow_none else "."))
        if not math.isfinite(value):
            raise ValueError(f"{reward} returned {value} for {where}; expected a finite number"
                             + (" (return None to leave an image unscored)." if allow_none else "."))
        checked.append(float(value))
    return checked


def combine_scores(scores: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sum_k w_k * r_k over the functions that scored an image (columns); NaN where none did (never paired)."""
    weights = torch.as_tensor(weights, dtype=scores.dtype)
    total = (scores * weights).nansum(dim=1)
    return torch.where(scores.isnan().all(dim=1), math.nan, total)


@dataclass
class Scores:
    """The scores of a set of images: `per_function` (images, functions) float64, NaN where a function returned
    None; `total` the weighted sum (NaN where no function scored); `names` the functions' metric names."""

    per_function: torch.Tensor
    total: torch.Tensor
    names: list[str]


def score_images(
    reward_funcs: Sequence,
    images: Sequence,
    prompts: Sequence[str],
    names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    columns: Mapping[str, Sequence] | None = None,
    batch_size: int | None = None,
    allow_none: bool = True,
    offset: int = 0,
) -> Scores:
    """Score `images` (one prompt each) with every reward function, `batch_size` images per call (all at once: None).

    `columns` (one value per image, plus anything else a TRL-style reward takes, e.g. `trainer_state`) go to the
    functions called TRL's way as keywords. `allow_none=False` refuses a None (a win rate needs every score).
    The global RNG is forked: a reward that draws random numbers does not change the training run around it.
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; expected one prompt per image.")
    names = unique_names([reward_name(fn) for fn in reward_funcs]) if names is None else list(names)
    weights = [1.0] * len(reward_funcs) if weights is None else list(weights)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"Got {len(weights)} weights for {len(reward_funcs)} reward functions; give one per function.")
    columns = dict(columns or {})
    step = batch_size or max(len(images), 1)
    scores = torch.full((len(images), len(reward_funcs)), math.nan, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        for k, (fn, name) in enumerate(zip(reward_funcs, names, strict=True)):
            trl = takes_trl_keywords(fn)
            for start in range(0, len(images), step):
                part, part_prompts = images[start : start + step], prompts[start : start + step]
                if trl:
                    part_columns = {key: value[start : start + step] if _per_image(value, len(images)) else value
                                    for key, value in columns.items()}
                    values = fn(prompts=part_prompts, completions=part, **part_columns)
                else:
                    values = fn(part, part_prompts)
                scores[start : start + len(part), k] = torch.tensor(
                    check_scores(values, part_prompts, name, allow_none, offset + start), dtype=torch.float64)
    return Scores(scores, combine_scores(scores, weights), names)


def _per_image(value, count: int) -> bool:
    return isinstance(value, list | tuple) and len(value) == count
