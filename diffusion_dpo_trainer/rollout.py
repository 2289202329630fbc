"""Rollouts: the current policy samples images for a batch of prompts, keeping what an on-policy trainer trains on.

The pipeline runs its own denoising loop (its guidance, its scheduler's timesteps, its latent packing), so a rollout
draws exactly the images the pipeline would. What happens at each denoising step is a swappable *sampler step*
object that wraps the scheduler's `step`: it sees the step's input latents, timestep and model output (after
guidance) and returns the next latents, plus extra per-step tensors (e.g. log-probabilities) to record:

- `SchedulerStep()` (the default) is the scheduler's own step, unchanged;
- `FunctionStep(fn, noise_level)` plugs in a pure step function on sigmas, `fn(latents, model_output, sigma,
  sigma_next, noise_level, generator=None) -> (prev_sample, log_prob, mean, std)` (the form of `sde.py`'s steps),
  for schedulers with a `sigmas` table (the rectified-flow ones); with noise level 0 an Euler step reproduces the
  pipeline's own output;
- `DDIMStep(eta)` is DDIM with eta (`sde.ddim_step`) on a `DDIMScheduler`, for the SD families.

Both take `stochastic`, the step indices that get the noise (a window, MixGRPO); the others are deterministic.

`record=True` keeps the trajectory: per image and step the input latents, next latents, timestep and model output,
and every extra the step returns (the steps above: schedule values, `log_prob`, and `prev_sample`, the float32
next latents, when the model's dtype rounds them), in the pipeline's latent layout.

Conditioning: the pipeline is called with the family's own prompt embeddings (`encode`: the trainer's text cache or
`family.encode_prompt`, where `max_prompt_length` applies), mapped by `family.pipeline_prompt_kwargs`, and with
guidance the family's `unconditional_conditioning` as the negative, never with prompt strings: a trainer conditions
its training forward on exactly the tensors the rollout sampled with (`guidance_conditioning`).

A trainer that conditions its training forward on the same tensors may encode them once and hand them over
(`conditioning`: one row per prompt, not per image), so nothing is encoded twice.

Seeds: image j of prompt g (its initial noise and a stochastic step's noise) is drawn with `derived_seed(seed, *key,
first + g, j)`, where `key` says which rollout it is (e.g. training step and micro-step) and `first` is the prompt's
place in the global batch, so a run is reproducible, resumes exactly, and N processes sample what one process would.
`noise_seeds` gives the initial noise a seed of its own: `group_noise_seeds` makes it one per group (DanceGRPO's and
MixGRPO's `init_same_noise`), a function of the global group index only, like the image seeds.
"""

import functools
import inspect
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .caching import derived_seed
from .sampling import iter_sample_batches
from .sde import ddim_alphas, ddim_step


def rollout_seeds(seed: int, key: Sequence[int], first: int, num_prompts: int, n: int) -> list[int]:
    """One seed per image, prompt-major: image j of prompt g (global index `first + g`) of rollout `key`."""
    return [derived_seed(seed, *key, first + g, j) for g in range(num_prompts) for j in range(n)]


#: The last entry of a group's initial-noise key: no image index, so the group's stream is none of its images' (which
#: a key without it would be: SeedSequence ignores a trailing 0, the key of image 0).
_GROUP_NOISE = 2**32 - 1


def group_noise_seeds(seed: int, key: Sequence[int], first: int, num_prompts: int, n: int) -> list[int]:
    """One initial-noise seed per image, prompt-major, the same for the `n` images of prompt g (global index
    `first + g`) of rollout `key`: the group starts from one noise and differs only by its stochastic steps."""
    return [derived_seed(seed, *key, first + g, _GROUP_NOISE) for g in range(num_prompts) for _ in range(n)]


class SchedulerStep:
    """The scheduler's own step: the pipeline's output, unchanged. Subclass it to see or change every step."""

    def __call__(self, scheduler, scheduler_step: Callable, model_output, timestep, latents, *args, **kwargs):
        """-> (next latents, dict of extra per-step tensors to record)."""
        return scheduler_step(model_output, timestep, latents, *args, return_dict=False, **kwargs)[0], {}


class FunctionStep(SchedulerStep):
    """A step function on sigmas in place of the scheduler's arithmetic; the scheduler still keeps the step count."""

    def __init__(self, fn: Callable, noise_level: float = 0.0, stochastic: Collection[int] | None = None):
        self.fn, self.noise_level, self.stochastic = fn, noise_level, stochastic

    def __call__(self, scheduler, scheduler_step, model_output, timestep, latents, *args, **kwargs):
        if getattr(scheduler, "sigmas", None) is None:
            raise ValueError(f"{type(scheduler).__name__} has no `sigmas` table: a step function on sigmas needs a "
                             "rectified-flow scheduler such as FlowMatchEulerDiscreteScheduler.")
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        index = scheduler.step_index
        sigma, sigma_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        # In float32 as the flow schedulers step, then back to the model's dtype.
        noise_level = self.noise_level if self.stochastic is None or index in self.stochastic else 0.0
        prev, log_prob, _, _ = self.fn(latents.float(), model_output.float(), sigma, sigma_next,
                                       noise_level, generator=kwargs.get("generator"))
        scheduler._step_index = index + 1
        extras = {"sigma": sigma.expand(len(latents)), "sigma_next": sigma_next.expand(len(latents))}
        if log_prob is not None:
            extras["log_prob"] = log_prob
        return _model_dtype(prev, model_output.dtype, extras)


class DDIMStep(SchedulerStep):
    """DDIM with eta (`sde.ddim_step`) in place of a `DDIMScheduler`'s step, recording each step's alphas; steps
    outside `stochastic` (step indices; None: all) take eta 0, the deterministic DDIM step."""

    def __init__(self, eta: float = 1.0, stochastic: Collection[int] | None = None):
        self.eta, self.stochastic = eta, stochastic
        self._schedule = None  # (the scheduler's timesteps, {timestep: (step index, alpha, alpha_prev)})

    def __call__(self, scheduler, scheduler_step, model_output, timestep, latents, *args, **kwargs):
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(f"{type(scheduler).__name__} is not a DDIMScheduler: DDIM with eta needs one (build it "
                             "with DDIMScheduler.from_config(pipeline.scheduler.config)).")
        index, alpha, alpha_prev = self._scheduled(scheduler, timestep)
        eta = self.eta if self.stochastic is None or index in self.stochastic else 0.0
        clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
        prev, log_prob, _, _ = ddim_step(latents.float(), model_output.float(), alpha, alpha_prev, eta,
                                         prediction_type=scheduler.config.prediction_type, clip_sample_range=clip,
                                         generator=kwargs.get("generator"))
        extras = {"alpha": alpha.expand(len(latents)), "alpha_prev": alpha_prev.expand(len(latents)),
                  "log_prob": log_prob}
        return _model_dtype(prev, model_output.dtype, extras)

    def _scheduled(self, scheduler, timestep) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The step index and alphas of `timestep`, from a table built once per `set_timesteps` (a new `timesteps`
        tensor) instead of a search and the alphas' arithmetic at every step."""
        if self._schedule is None or self._schedule[0] is not scheduler.timesteps:
            alphas, alphas_prev = ddim_alphas(scheduler, scheduler.timesteps)
            table = {int(t): (i, a.float().reshape(1), p.float().reshape(1))
                     for i, (t, a, p) in enumerate(zip(scheduler.timesteps, alphas, alphas_prev))}
            self._schedule = (scheduler.timesteps, table)
        return self._schedule[1][int(timestep)]


def _model_dtype(prev: torch.Tensor, dtype: torch.dtype, extras: dict) -> tuple[torch.Tensor, dict]:
    """The next latents in the model's dtype for the pipeline; when that rounds them (bf16), the float32 sample whose
    log-density was computed is recorded too (`prev_sample`), so training recomputes the density of the same sample
    (flow_grpo keeps the float32 sample the same way)."""
    if prev.dtype != dtype:
        extras["prev_sample"] = prev
    return prev.to(dtype), extras


def guidance_conditioning(family, conditioning: dict, encode: Callable, guidance_scale: float) -> dict | None:
    """The unconditional conditioning the family's pipeline guides with at `guidance_scale` (one row per row of
    `conditioning`), or None where it runs no unconditional branch."""
    if family.guidance(guidance_scale) != "cfg":
        return None
    return family.unconditional_conditioning(conditioning, encode)


@dataclass
class Rollout:
    """One rollout: per image (prompt-major) its prompt and seed, its final latents (float32, in the family's training
    layout, as `compute_loss` reads them), its decoded image (None unless asked) and, when recorded, its trajectory
    (name -> tensor of shape (images, steps, ...))."""

    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor
    images: list | None = None
    trajectory: dict[str, torch.Tensor] | None = None


@contextmanager
def _stepping(pipeline, step: SchedulerStep, records: list[dict] | None, noise_seeds: dict[int, int] | None = None):
    """The pipeline's scheduler's `step` routed through `step` (and recorded) for the duration, on this instance only.

    A step whose signature takes `generator` gets the per-image generators of the pipeline call (caught at
    `prepare_latents`), as diffusers' SD pipelines pass them and its flow pipelines do not: a stochastic step's noise
    then comes from each image's own seed, not from the global RNG (which `sampling_mode` restores after every call,
    so each rollout would draw the same noise, and N processes other noise than one). `noise_seeds` (an image's seed
    -> its initial noise's seed) makes `prepare_latents` draw from generators of those seeds instead, in the
    pipeline's own layout; the steps keep the images' generators.
    """
    scheduler = pipeline.scheduler
    scheduler_step = scheduler.step
    takes_generator = "generator" in inspect.signature(scheduler_step).parameters
    prepare_latents = getattr(pipeline, "prepare_latents", None)
    if noise_seeds is not None and prepare_latents is None:
        raise ValueError(f"{type(pipeline).__name__} has no `prepare_latents`: its initial noise cannot be drawn "
                         "from other seeds (`noise_seeds`).")
    drawn = {}

    if prepare_latents is not None:
        binding = inspect.signature(prepare_latents)

        @functools.wraps(prepare_latents)
        def preparing(*args, **kwargs):
            bound = binding.bind(*args, **kwargs)
            drawn["generator"] = bound.arguments.get("generator")
            if noise_seeds is not None:
                bound.arguments["generator"] = [torch.Generator(g.device).manual_seed(noise_seeds[g.initial_seed()])
                                                for g in drawn["generator"]]
            return prepare_latents(*bound.args, **bound.kwargs)

        pipeline.prepare_latents = preparing

    # The scheduler's signature: pipelines pass `generator` / `eta` only to a step whose signature takes them.
    @functools.wraps(scheduler_step)
    def stepped(model_output, timestep, sample, *args, return_dict=True, **kwargs):
        if takes_generator and kwargs.get("generator") is None and drawn.get("generator") is not None:
            kwargs["generator"] = drawn["generator"]
        prev, extras = step(scheduler, scheduler_step, model_output, timestep, sample, *args, **kwargs)
        if records is not None:
            records.append({"latents": sample, "next_latents": prev, "model_output": model_output,
                            "timesteps": torch.as_tensor(timestep).float().expand(len(sample)), **extras})
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    scheduler.step = stepped
    try:
        yield
    finally:
        del scheduler.step  # the class's method again
        if prepare_latents is not None:
            del pipeline.prepare_latents


def rollout(
    family,
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int,
    batch_size: int | None = None,
    decode: bool = True,
    step: SchedulerStep | None = None,
    record: bool = False,
    encode: Callable[[list[str]], dict] | None = None,
    conditioning: tuple[dict, dict | None] | None = None,
    noise_seeds: Sequence[int] | None = None,
    **pipeline_kwargs,
) -> Rollout:
    """Sample one image per (prompt, seed) from `family.pipeline` as it is now (the policy: adapter on), in eval mode
    without grad (`sampling.sampling_mode`), `batch_size` images per pipeline call (None: all at once).

    `decode=False` skips the VAE decode (no images); `step` replaces the scheduler's step; `record` keeps the
    trajectory; `encode(prompts)` gives the prompts' conditioning as `family.encode_prompt` returns it (None: that
    method, on the pipeline's device). `conditioning`, in place of `encode`: the conditioning and guidance's negative
    (`guidance_conditioning`) already encoded, one row per `len(prompts) // rows` consecutive prompts (a group's
    images share their prompt's row), expanded per pipeline call. `noise_seeds`: per image, the seed of its initial
    noise (None: its own seed). `pipeline_kwargs` go to the pipeline call (`num_inference_steps`, `guidance_scale`,
    ...), after the family's `sampling_kwargs` (Wan's clip length, Sana without resolution binning).
    """
    step = SchedulerStep() if step is None else step
    records: list[dict] | None = [] if record else None
    pipeline = family.pipeline
    if encode is None:
        def encode(texts):
            return family.encode_prompt(list(texts), pipeline._execution_device)
    guidance_scale = pipeline_kwargs.get(
        "guidance_scale", inspect.signature(type(pipeline).__call__).parameters["guidance_scale"].default)

    if conditioning is None:
        def prompt_kwargs(batch_prompts):  # per pipeline call, as the pipeline encodes its own prompts
            encoded = encode(batch_prompts)
            return family.pipeline_prompt_kwargs(
                encoded, guidance_conditioning(family, encoded, encode, guidance_scale))
    else:
        rows = len(next(iter(conditioning[0].values())))
        if len(prompts) % rows:
            raise ValueError(f"`conditioning` has {rows} rows for {len(prompts)} prompts: expected one row per "
                             "equal run of consecutive prompts (a group).")
        per_row, done = len(prompts) // rows, [0]

        def prompt_kwargs(batch_prompts):  # called once per pipeline call, in order
            index = torch.arange(done[0], done[0] + len(batch_prompts)) // per_row
            done[0] += len(batch_prompts)
            return family.pipeline_prompt_kwargs(*({key: value[index.to(value.device)] for key, value in entry.items()}
                                                   if entry is not None else None for entry in conditioning))

    batches = iter_sample_batches(
        pipeline, prompts, seeds, batch_size or len(prompts), progress=False, return_latents=True,
        prompt_kwargs=prompt_kwargs, output_type="pil" if decode else "latent", height=resolution, width=resolution,
        **{**family.sampling_kwargs(), **pipeline_kwargs})
    images, latents, trajectory = [], [], []
    noise_of = None  # image seed -> initial-noise seed: the pipeline's generators are known by their seeds
    if noise_seeds is not None:
        if len(noise_seeds) != len(seeds):
            raise ValueError(f"Got {len(noise_seeds)} noise_seeds for {len(seeds)} seeds; expected one per image.")
        noise_of = {}
        for image_seed, noise_seed in zip(map(int, seeds), map(int, noise_seeds)):
            if noise_of.setdefault(image_seed, noise_seed) != noise_seed:
                raise ValueError(f"Seed {image_seed} is given two initial-noise seeds in `noise_seeds`.")
    plain = type(step) is SchedulerStep and not record and noise_of is None  # the pipeline untouched
    with nullcontext() if plain else _stepping(pipeline, step, records, noise_of):
        for batch_images, batch_latents in batches:
            images += batch_images or []
            latents.append(family.sampled_latents(batch_latents, resolution).float())
            if records:
                trajectory.append({name: torch.stack([r[name] for r in records], dim=1) for name in records[0]})
                records.clear()
    if trajectory:
        trajectory = {name: torch.cat([t[name] for t in trajectory]) for name in trajectory[0]}
    return Rollout(list(prompts), list(seeds), torch.cat(latents), images if decode else None, trajectory or None)
