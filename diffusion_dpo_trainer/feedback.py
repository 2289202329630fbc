"""AI-feedback preference pairs: sample several images per prompt from a pipeline, score them with a reward
function, and pair them up into the canonical (prompt, chosen, rejected) format the trainer reads.

This is the paper's "AI feedback" variant: a reward model (PickScore, CLIP, a classifier...) labels the pairs
instead of people. The scores stay in the dataset (`chosen_score`, `rejected_score`) and so do the seeds
(`chosen_seed`, `rejected_seed`): every image can be regenerated from its prompt and seed.
"""

import io
import json
import logging
import os
import shutil
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .families import load_pipeline
from .pairing import select_pairs
from .rewards import RewardFn, load_reward
from .rewards.scoring import score_images
from .sampling import iter_sample_batches
from .video_data import encode_video

logger = logging.getLogger(__name__)

FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": datasets.Image(),
        "rejected": datasets.Image(),
        "chosen_score": datasets.Value("float64"),
        "rejected_score": datasets.Value("float64"),
        "chosen_seed": datasets.Value("int64"),
        "rejected_seed": datasets.Value("int64"),
    }
)


#: Video pairs store mp4 bytes (decoded by the trainer with PyAV; `decode=False` because decoding a `datasets.Video`
#: needs torchcodec: cast to `datasets.Video()` to read them with it).
VIDEO_FEATURES = datasets.Features(
    {**FEATURES, "chosen": datasets.Video(decode=False), "rejected": datasets.Video(decode=False)}
)


def _encoded(sample) -> dict:
    """Encode once: an image as PNG, a video (list of frames) as mp4: kilobytes instead of decoded bitmaps."""
    if isinstance(sample, (list, tuple)):
        return {"bytes": encode_video(sample), "path": None}
    buffer = io.BytesIO()
    sample.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def build_preference_pairs(
    pipeline,
    prompts: Sequence[str],
    reward_fn: RewardFn | str,
    num_images_per_prompt: int = 4,
    strategy: str = "best_vs_worst",
    min_score_gap: float = 0.0,
    num_pairs_per_prompt: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    output_path: str | os.PathLike | None = None,
    progress: bool = True,
    **pipeline_kwargs,
) -> datasets.Dataset:
    """Sample `num_images_per_prompt` images per prompt, score them, and return the pairs as a `datasets.Dataset`.

    Args:
        pipeline: a `DiffusionPipeline`, or a hub id / local path to load one from.
        prompts: one entry per prompt; repeat a prompt to get more independent groups for it.
        reward_fn: `reward_fn(images, prompts) -> scores` (higher is better), or a name for `load_reward`
            (`"pickscore"`, `"clip:<id or path>"`, `"package.module:function"`).
        num_images_per_prompt: images sampled per prompt (at least 2).
        strategy, min_score_gap, num_pairs_per_prompt: how images become pairs; see `select_pairs`.
        seed: image j of prompt i is drawn with seed `seed + i * num_images_per_prompt + j` (kept in the dataset),
            and the `random` strategy draws its pairs from `numpy.random.default_rng(seed)`.
        batch_size: images per pipeline call and per reward call.
        output_path: if given, the dataset is also written there with `save_to_disk`; until then the sampled images
            are kept beside it in `<output_path>.samples/`, so that a run stopped by an error or a kill, started
            again with the same arguments, samples only the images it lacks.
        **pipeline_kwargs: passed to the pipeline call (`num_inference_steps`, `guidance_scale`, `height`, ...).

    Returns columns `prompt`, `chosen`, `rejected` (images), `chosen_score`, `rejected_score`, `chosen_seed`,
    `rejected_seed`. Prompts whose images all score the same (within the gap) contribute no pair; a run that makes no
    pair at all is an error. A score that is not a finite number is an error naming the image and its prompt. A video pipeline
    (e.g. `WanPipeline`, with `num_frames`, `height`, `width` in `pipeline_kwargs`) gives videos: `reward_fn` scores
    lists of frames (see `rewards.frame_averaged`) and the pairs hold mp4 bytes (`VIDEO_FEATURES`).
    """
    if num_images_per_prompt < 2:
        raise ValueError(f"num_images_per_prompt must be at least 2 to make a pair, got {num_images_per_prompt}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty: there is nothing to sample.")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{row}]: expected a string, got {type(prompt).__name__}.")
    pipeline = load_pipeline(pipeline)
    reward_fn = load_reward(reward_fn)
    n = num_images_per_prompt
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_seeds = [seed + k for k in range(len(flat_prompts))]
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in FEATURES}
    # Images are scored batch by batch and paired (then PNG-encoded) as soon as a prompt's group is complete, so
    # memory holds at most one batch plus one group of decoded images.
    images, scores, done, prompt_index, video = [], [], 0, 0, False
    samples = None
    if output_path is not None:
        samples = _sample_cache(os.fspath(output_path) + SAMPLES_SUFFIX, pipeline, flat_prompts,
                                flat_seeds, pipeline_kwargs)
    batches = _kept_or_sampled(pipeline, flat_prompts, flat_seeds, batch_size, samples, progress, pipeline_kwargs)
    for batch in batches:
        video = isinstance(batch[0], (list, tuple))  # a video pipeline yields lists of frames
        # None (not scored) becomes NaN, which never wins a comparison: such an image is never paired.
        batch_scores = score_images([reward_fn], batch, flat_prompts[done : done + len(batch)],
                                    offset=done).total.tolist()
        done += len(batch)
        images += batch
        scores += batch_scores
        while len(images) >= n:
            group_seeds = flat_seeds[prompt_index * n : (prompt_index + 1) * n]
            for w, l in select_pairs(scores[:n], strategy, min_score_gap, num_pairs_per_prompt, rng):
                rows["prompt"].append(prompts[prompt_index])
                rows["chosen"].append(_encoded(images[w]))
                rows["rejected"].append(_encoded(images[l]))
                rows["chosen_score"].append(scores[w])
                rows["rejected_score"].append(scores[l])
                rows["chosen_seed"].append(group_seeds[w])
                rows["rejected_seed"].append(group_seeds[l])
            images, scores, prompt_index = images[n:], scores[n:], prompt_index + 1
    if not rows["prompt"]:
        raise ValueError(f"No preference pair: the reward gave no two images of any of the {len(prompts)} prompt(s) "
                         f"scores more than min_score_gap={min_score_gap} apart (strategy {strategy!r}); check the "
                         "reward (a constant or unscored reward cannot rank images), or sample more images per prompt.")
    dataset = datasets.Dataset.from_dict(rows, features=VIDEO_FEATURES if video else FEATURES)
    if output_path is not None:
        dataset.save_to_disk(os.fspath(output_path))
        shutil.rmtree(samples)
    return dataset


#: With `output_path`, every sampled image is kept in `output_path + SAMPLES_SUFFIX` until the dataset is saved: a run
#: stopped by a failing reward (or a kill) and started again with the same arguments reads them back instead of
#: sampling again. Beside the dataset, not in it: a failed run leaves no `output_path`.
SAMPLES_SUFFIX = ".samples"


def _sample_cache(folder: str, pipeline, prompts, seeds, pipeline_kwargs) -> str:
    """`folder`, holding only images of this very run: those of other arguments or other weights are dropped."""
    from .caching import module_fingerprint

    modules = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
    key = {"prompts": prompts, "seeds": seeds, "pipeline_kwargs": {k: repr(v) for k, v in pipeline_kwargs.items()},
           "weights": module_fingerprint(*modules)}
    settings = os.path.join(folder, "settings.json")
    if os.path.isfile(settings):
        with open(settings, encoding="utf-8") as f:
            if json.load(f) == key:
                return folder
        logger.warning(f"{folder} holds images of another run (other prompts, seeds, settings or weights): "
                       "sampling again.")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    with open(settings, "w", encoding="utf-8") as f:
        json.dump(key, f)
    return folder


def _kept_or_sampled(pipeline, prompts, seeds, batch_size, folder, progress, pipeline_kwargs):
    """`iter_sample_batches`, reading back each image kept in `folder` and keeping each new one there (written to a
    temporary name, then renamed: a kill never leaves half a file). Videos are not kept."""
    with tqdm(total=len(prompts), desc="Sampling", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            window = range(start, min(start + batch_size, len(prompts)))
            paths = {k: os.path.join(folder, f"{k:06d}_{seeds[k]}.png") for k in window} if folder else {}
            kept = {k: _read_png(paths[k]) for k in window if folder and os.path.isfile(paths[k])}
            missing = [k for k in window if k not in kept]
            if missing:
                batch = next(iter_sample_batches(pipeline, [prompts[k] for k in missing], [seeds[k] for k in missing],
                                                 len(missing), False, **pipeline_kwargs))
                for k, image in zip(missing, batch):
                    kept[k] = image
                    if folder and isinstance(image, Image.Image):
                        image.save(paths[k] + ".tmp", format="PNG")
                        os.replace(paths[k] + ".tmp", paths[k])
            bar.update(len(window))
            yield [kept[k] for k in window]


def _read_png(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image
