"""Seeded, batched sampling from a diffusers pipeline, safe to run in the middle of training.

Every image has its own seed (a CPU `torch.Generator`), so an image is reproducible from its (prompt, seed) alone,
on any device, and a policy and its reference sampled with the same seed start from the same noise: the only
difference between the two images is the model. Sampling switches the pipeline's modules to eval mode and back,
runs under `torch.no_grad` and forks the global RNG, so a training run that samples gives the same weights as one
that does not.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from .families import family_class_for


def _modules(pipeline: DiffusionPipeline) -> list[torch.nn.Module]:
    return [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]


def adapters_disabled(pipeline: DiffusionPipeline):
    """The pipeline run as its base model (LoRA adapters off), through its family's one reference switch."""
    return family_class_for(type(pipeline).__name__)(pipeline).reference_pipeline()


@contextmanager
def sampling_mode(pipeline: DiffusionPipeline):
    """Eval mode, no grad, a forked RNG and a silent pipeline progress bar; everything restored afterwards."""
    modules = _modules(pipeline)
    was_training = [m.training for m in modules]
    bar_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    device = pipeline.device
    fork = {"devices": [device]} if device.type == "cuda" else {"devices": []}
    try:
        for module in modules:
            module.eval()
        pipeline.set_progress_bar_config(**{**bar_config, "disable": True})
        with torch.random.fork_rng(**fork), torch.no_grad():
            yield pipeline
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)
        pipeline.set_progress_bar_config(**bar_config)


def iter_sample_batches(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 8,
    progress: bool | str = True,
    return_latents: bool = False,
    prompt_kwargs: Callable[[list[str]], dict] | None = None,
    **pipeline_kwargs,
) -> Iterator[list[Image.Image]] | Iterator[tuple[list[Image.Image], torch.Tensor]]:
    """Yield the images of `sample_images` one batch at a time, so callers can score and drop them as they come.

    With `return_latents`, yield `(images, latents)`: the final latents the pipeline decoded into those images, as
    the denoiser produced them (captured with `callback_on_step_end`, so nothing is re-encoded). With
    `output_type="latent"` nothing is decoded and `images` is None. `prompt_kwargs(batch_prompts)`, when given, returns
    the pipeline's keyword arguments in place of the prompt strings (embeddings: a family's `pipeline_prompt_kwargs`),
    called per batch in sampling mode.
    """
    output_type = pipeline_kwargs.pop("output_type", "pil")
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    description = progress if isinstance(progress, str) else "Sampling"
    with tqdm(total=len(prompts), desc=description, disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            final = {}
            if return_latents:
                def keep_latents(pipe, step, timestep, tensors, final=final):
                    final["latents"] = tensors["latents"]
                    return tensors

                pipeline_kwargs = {**pipeline_kwargs, "callback_on_step_end": keep_latents,
                                   "callback_on_step_end_tensor_inputs": ["latents"]}
            # Entered per batch, so nothing stays switched while the caller works on a yielded batch.
            with sampling_mode(pipeline):
                text = {"prompt": batch_prompts} if prompt_kwargs is None else prompt_kwargs(batch_prompts)
                output = pipeline(**text, generator=generators, output_type=output_type, **pipeline_kwargs)
            bar.update(len(batch_prompts))
            # Video pipelines (Wan) return `frames`: one list of PIL frames per video.
            images = None if output_type == "latent" else output.images if hasattr(output, "images") else output.frames
            yield (images, final["latents"]) if return_latents else images


def sample_images(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 8,
    progress: bool | str = True,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order, generated `batch_size` at a time.

    For a video pipeline each "image" is a video: a list of PIL frames (pass `num_frames`, `height`, `width`).
    `prompts` and `seeds` have the same length; image i is drawn from `torch.Generator().manual_seed(seeds[i])`,
    so it does not depend on the other images (up to float rounding when the batch size changes).
    `pipeline_kwargs` go to the pipeline call (`num_inference_steps`, `guidance_scale`, `height`, `width`, ...).
    `progress` shows a tqdm bar over images; a string is used as its description.
    """
    batches = iter_sample_batches(pipeline, prompts, seeds, batch_size, progress, **pipeline_kwargs)
    return [image for batch in batches for image in batch]
