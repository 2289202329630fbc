"""The evaluation protocol papers report, as one call: `evaluate_protocol` (and `diffusion-dpo evaluate
--prompt_set ...`).

For every prompt set, every prompt and every seed, the base model and the tuned one (the same pipeline with a LoRA,
a fine-tuned denoiser, or a separate pipeline) each sample one image from the same seed; every reward scores every
image. The report gives, per prompt set and reward:

- the mean score of base and tuned, each with a 95% confidence interval;
- the win rate of tuned over base (a tie, equal scores, counts half: `evaluation.compare_rewards`), with its interval;

and per prompt set and variant the image statistics that move when a model hacks its reward, and the diversity
across the seeds of a prompt (`hacking.grouped_signals`; `image_statistics` in `report.json`).

Intervals are percentile bootstraps over PROMPTS (1000 resamples, seed 0), the seeds of a prompt averaged first:
images of one prompt are not independent draws, so resampling images would make the intervals too narrow.

The sampler settings default to the paper's for the model family (`DiffusionFamily.evaluation_sampling`: SD1.5
50 steps at guidance 7.5, SDXL 50 steps at guidance 5, each pipeline's own scheduler) and are recorded with the
library versions in `report.json`. Every image is saved as `images/<set>/<variant>/<prompt>_<seed>.png` and every
score appended to `scores.jsonl` as soon as its batch is done: a killed evaluation, started again with the same
arguments, samples only what is missing (other arguments are refused, so two protocols never mix). What is kept is
keyed on the weights' content, not their paths: a variant whose weights changed (an adapter retrained into the same
folder) is sampled again.
"""

import json
import logging
import platform
import re
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ._version import __version__
from .caching import module_fingerprint
from .evaluation import compare_rewards
from .families import family_class_for, load_pipeline
from .hacking import grouped_signals
from .prompt_sets import load_prompt_sets
from .rewards import load_reward
from .rewards.scoring import reward_name, score_images
from .sampling import adapters_disabled, iter_sample_batches

logger = logging.getLogger(__name__)
VARIANTS = ("base", "tuned")
BOOTSTRAP_RESAMPLES = 1000


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"diffusion_dpo_trainer": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def sampling_settings(pipeline, scheduler: str | None = None, num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, resolution: int | None = None) -> dict:
    """The pipeline-call settings: what was given, else the family's published ones, else the pipeline's own."""
    try:
        published = family_class_for(type(pipeline).__name__).evaluation_sampling
    except ValueError:
        published = {}
    if scheduler is not None:
        import diffusers

        if not hasattr(diffusers, scheduler):
            raise ValueError(f"Unknown scheduler {scheduler!r}; expected a diffusers scheduler class name such as "
                             "'DDIMScheduler' or 'EulerDiscreteScheduler'.")
        pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    kwargs = dict(published)
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if resolution is not None:
        kwargs.update(height=resolution, width=resolution)
    return {"scheduler": type(pipeline.scheduler).__name__, **kwargs}


def _load_denoiser(family, path: str):
    """A fine-tuned denoiser of the family's class: a folder or hub id holding it, or its `unet`/`transformer`
    subfolder (as `mhdang/dpo-sdxl-text2image-v1` does)."""
    original = family.denoiser
    subfolder = None if (Path(path) / "config.json").is_file() else family.denoiser_name
    denoiser = type(original).from_pretrained(path, subfolder=subfolder, use_safetensors=True)
    return denoiser.to(device=original.device, dtype=original.dtype).requires_grad_(False)


def _variants(pipeline, lora=None, denoiser=None, reference=None) -> dict:
    """variant name -> context manager factory yielding the pipeline that samples it."""
    if sum(x is not None for x in (lora, denoiser, reference)) > 1:
        raise ValueError("Give at most one of `lora`, `denoiser` and `reference`: they all define the tuned model.")

    @contextmanager
    def as_is(pipe=pipeline):
        yield pipe

    if lora is not None:
        pipeline.load_lora_weights(lora)
        return {"base": lambda: adapters_disabled(pipeline), "tuned": as_is}
    if denoiser is not None:  # the family's reference switch puts the pipeline's own denoiser back for "base"
        family = family_class_for(type(pipeline).__name__)(pipeline)
        tuned = _load_denoiser(family, denoiser)
        family.set_reference(family.denoiser)
        setattr(pipeline, family.denoiser_name, tuned)
        return {"base": family.reference_pipeline, "tuned": as_is}
    if reference is not None:  # `pipeline` is the tuned model, `reference` the base (as in `evaluate_win_rate`)
        base = load_pipeline(reference)
        return {"base": lambda: as_is(base), "tuned": as_is}
    return {"base": as_is}


def _weight_fingerprints(variants: dict) -> dict[str, str]:
    """variant -> a hash of every weight its images depend on (denoiser, adapters, VAE, text encoders), so that a
    resumed evaluation never mixes images of different weights saved at the same path. The base ignores adapter
    tensors: they are switched off while it samples."""
    fingerprints = {}
    for name, variant in variants.items():
        with variant() as pipe:
            modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
            fingerprints[name] = module_fingerprint(*modules, ignore="lora_" if name == "base" else None)
    return fingerprints


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _reward_names(rewards) -> list[str]:
    names = [reward_name(r) for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"Reward names must be unique, got {names}.")
    return names


def _bootstrap(per_prompt: np.ndarray) -> list[float]:
    if len(per_prompt) < 2:
        return [float(per_prompt.mean())] * 2
    rng = np.random.default_rng(0)  # per statistic: an interval never depends on which others were computed
    samples = rng.choice(per_prompt, size=(BOOTSTRAP_RESAMPLES, len(per_prompt)), replace=True).mean(axis=1)
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def summarize(rows: list[dict], reward_names: Sequence[str]) -> dict:
    """Per prompt set and reward: the mean and 95% CI of each variant and the win rate of tuned over base."""
    results = {}
    by_set = defaultdict(list)
    for row in rows:
        by_set[row["set"]].append(row)
    for set_name, set_rows in by_set.items():
        results[set_name] = {}
        for reward in reward_names:
            scores = {(r["variant"], r["index"], r["seed"]): r["scores"][reward] for r in set_rows}
            keys = sorted({(i, s) for v, i, s in scores if v == "base"})
            entry = {"num_prompts": len({i for i, _ in keys}), "num_images_per_variant": len(keys)}
            for variant in sorted({v for v, _, _ in scores}):
                per_prompt = defaultdict(list)
                for i, s in keys:
                    per_prompt[i].append(scores[(variant, i, s)])
                means = np.array([np.mean(v) for v in per_prompt.values()])
                entry[variant] = {"mean": float(means.mean()), "ci95": _bootstrap(means)}
            if "tuned" in entry:
                outcomes = compare_rewards([scores[("tuned", i, s)] for i, s in keys],
                                           [scores[("base", i, s)] for i, s in keys])["outcomes"]
                per_prompt = defaultdict(list)
                for (i, _), outcome in zip(keys, outcomes):
                    per_prompt[i].append({"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome])
                wins = np.array([np.mean(v) for v in per_prompt.values()])
                entry["win_rate"] = {"value": float(wins.mean()), "ci95": _bootstrap(wins),
                                     **{k: outcomes.count(k) for k in ("win", "tie", "loss")}}
            results[set_name][reward] = entry
    return results


def _read_rows(path: Path) -> list[dict]:
    """The scores written so far. A last line cut short by a kill is dropped (its batch is redone) and the file
    rewritten without it, so that the rows appended next do not land on a broken line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(rows) < len(lines) or (lines and not path.read_text(encoding="utf-8").endswith("\n")):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def evaluate_protocol(
    model,
    prompt_sets: Sequence[str] | dict[str, list[str]],
    rewards: Sequence,
    output_dir: str,
    lora: str | None = None,
    denoiser: str | None = None,
    reference=None,
    seeds: Sequence[int] = (0,),
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    max_prompts: int | None = None,
    batch_size: int = 4,
    num_html_samples: int = 8,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    reward_kwargs: dict | None = None,
) -> dict:
    """Run (or resume) the protocol and write `report.json` and `report.html` to `output_dir`; returns the report.

    Args:
        model: the base pipeline (a `DiffusionPipeline`, hub id or path); with `reference`, the tuned one.
        prompt_sets: names or sources for `prompt_sets.load_prompt_sets`, or `{name: prompts}`.
        rewards: names for `rewards.load_reward` (each reported separately) or reward functions.
        lora / denoiser / reference: the tuned model: a LoRA loaded into `model`, a fine-tuned denoiser folder, or
            (`reference`) a separate base pipeline, `model` being the tuned one. None of them: base scores only.
        seeds: every prompt is sampled once per seed by each variant.
        scheduler, num_inference_steps, guidance_scale, resolution: override the paper's settings.
        max_prompts: keep the first N prompts of each set (quick runs).
        batch_size: images per pipeline call.
        num_html_samples: prompts per set shown side by side in `report.html`.
        device, dtype: where and in which precision ("float16", "bfloat16") the pipeline runs; the rewards run on
            `device` too, in their own precision (float32 unless `reward_kwargs` says otherwise).
        reward_kwargs: passed to `load_reward` (`batch_size`, `dtype`, ...).
    """
    from .report import write_html

    out = Path(output_dir)
    sets = dict(prompt_sets) if isinstance(prompt_sets, dict) else load_prompt_sets(prompt_sets, max_prompts)
    names = _reward_names(rewards)
    pipeline = load_pipeline(model, {"torch_dtype": dtype} if dtype else None)
    if device is not None:
        pipeline.to(device)
    settings = {
        "model": model if isinstance(model, str) else getattr(pipeline, "name_or_path", type(pipeline).__name__),
        "lora": lora, "denoiser": denoiser, "reference": reference if reference is None or isinstance(reference, str)
        else type(reference).__name__,
        "sampling": sampling_settings(pipeline, scheduler, num_inference_steps, guidance_scale, resolution),
        "dtype": str(pipeline.dtype).removeprefix("torch."), "seeds": [int(s) for s in seeds], "rewards": names,
        "prompt_sets": {name: len(prompts) for name, prompts in sets.items()},
    }
    variants = _variants(pipeline, lora, denoiser, reference)
    settings["weights"] = _weight_fingerprints(variants)
    settings_file = out / "settings.json"
    stale = []
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if k != "weights" and previous.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(changed)}); resume it with "
                             "the same arguments or choose another output directory.")
        stale = [v for v in variants if (previous.get("weights") or {}).get(v) != settings["weights"][v]]
    out.mkdir(parents=True, exist_ok=True)
    scores_file = out / "scores.jsonl"
    rows = _read_rows(scores_file)
    if stale and rows:  # the same paths, other weights (e.g. an adapter retrained into the same folder)
        logger.warning(f"{out}: the weights of {' and '.join(stale)} changed since its images were sampled; sampling "
                       "them again.")
        rows = [row for row in rows if row["variant"] not in stale]
        scores_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # Written once the stale rows are gone: a kill in between leaves the old fingerprints, so they are dropped again.
    settings_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    done = {(r["set"], r["variant"], r["index"], r["seed"]) for r in rows}
    pending = {(name, variant): [(i, s) for i in range(len(prompts)) for s in settings["seeds"]
                                 if (name, variant, i, s) not in done]
               for name, prompts in sets.items() for variant in variants}
    total = sum(len(items) for items in pending.values())
    reward_kwargs = {**({"device": device} if device is not None else {}), **(reward_kwargs or {})}
    reward_fns = [load_reward(r, **reward_kwargs) if isinstance(r, str) else r for r in rewards]
    call_kwargs = {k: v for k, v in settings["sampling"].items() if k != "scheduler"}
    with tqdm(total=total, desc="Sampling and scoring", disable=not progress) as bar, \
            scores_file.open("a", encoding="utf-8") as log:
        for (set_name, variant), items in pending.items():
            if not items:
                continue
            folder = out / "images" / _slug(set_name) / variant
            folder.mkdir(parents=True, exist_ok=True)
            prompts = [sets[set_name][i] for i, _ in items]
            with variants[variant]() as pipe:
                batches = iter_sample_batches(pipe, prompts, [s for _, s in items], batch_size, False, **call_kwargs)
                for start, images in zip(range(0, len(items), batch_size), batches):
                    batch_items, batch_prompts = items[start : start + batch_size], prompts[start : start + batch_size]
                    for (i, s), image in zip(batch_items, images):
                        image.save(folder / f"{i:05d}_{s}.png")
                    scores = score_images(reward_fns, images, batch_prompts, names, allow_none=False,
                                          offset=start).per_function.T.tolist()
                    for k, ((i, s), prompt) in enumerate(zip(batch_items, batch_prompts)):
                        row = {"set": set_name, "variant": variant, "index": i, "seed": s, "prompt": prompt,
                               "scores": {name: scores[j][k] for j, name in enumerate(names)}}
                        log.write(json.dumps(row) + "\n")
                        rows.append(row)
                    log.flush()
                    bar.update(len(batch_items))

    report = {"settings": {**settings, "versions": _versions()}, "results": summarize(rows, names),
              # What moves when a tuned model hacks its reward (hacking.py), from the saved images, prompt by prompt.
              "image_statistics": {name: {v: grouped_signals(
                  [Image.open(out / "images" / _slug(name) / v / f"{i:05d}_{s}.png") for s in settings["seeds"]]
                  for i in range(len(prompts))) for v in variants} for name, prompts in sets.items()}}
    # allow_nan=False: a non-finite figure is a bug to see here, never a bare NaN that makes the file invalid JSON.
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    samples = {name: [(i, prompts[i], {v: out / "images" / _slug(name) / v / f"{i:05d}_{settings['seeds'][0]}.png"
                                       for v in variants})
                      for i in range(min(num_html_samples, len(prompts)))] for name, prompts in sets.items()}
    write_html(out / "report.html", report, samples)
    return report
