"""Reward win rate of a policy against its reference: standalone (`evaluate_win_rate`) and during training
(`RewardEvaluationCallback`); reward hacking made visible during training (`RewardHackingCallback`).

A comparison is one (prompt, seed): the policy and the reference each generate one image from the same seed (the
same starting noise), the reward function scores both, and the policy WINS if its score is higher by more than
`tie_margin`, LOSES if lower by more than `tie_margin`, and TIES otherwise. A tie counts as half a win:

    win_rate = (wins + 0.5 * ties) / comparisons

so a policy identical to its reference has a win rate of exactly 0.5, and 0.5 means "no better, no worse".
This is the paper's headline measure (DPO-SDXL preferred over SDXL about 70% of the time), with a reward model as
the judge instead of people.
"""

import importlib.util
import logging
import math
import re
import statistics
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from .families import load_pipeline
from .hacking import hacking_alerts, hacking_signals
from .rewards import RewardFn, load_reward
from .rewards.scoring import score_images
from .sampling import adapters_disabled, sample_images

logger = logging.getLogger(__name__)


def _score(reward_fn: RewardFn, images: list[Image.Image], prompts: list[str], batch_size: int) -> list[float]:
    """Every image scored (a win rate has no place for an unscored image), with the checks all callers share."""
    return score_images([reward_fn], images, prompts, batch_size=batch_size, allow_none=False).total.tolist()


def compare_rewards(rewards: Sequence[float], reference_rewards: Sequence[float], tie_margin: float = 0.0) -> dict:
    """Win/loss/tie counts and the win rate (ties count half) of paired reward lists."""
    if len(rewards) != len(reference_rewards) or not rewards:
        raise ValueError(f"Expected two non-empty reward lists of equal length, got {len(rewards)} and {len(reference_rewards)}.")
    outcomes = []
    for policy, reference in zip(rewards, reference_rewards):
        diff = policy - reference
        outcomes.append("win" if diff > tie_margin else "loss" if diff < -tie_margin else "tie")
    wins, losses, ties = (outcomes.count(o) for o in ("win", "loss", "tie"))
    return {
        "win_rate": (wins + 0.5 * ties) / len(outcomes),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "num_comparisons": len(outcomes),
        "reward": statistics.fmean(rewards),
        "reward_reference": statistics.fmean(reference_rewards),
        "outcomes": outcomes,
    }


def evaluate_win_rate(
    policy_pipe,
    reference_pipe,
    prompts: Sequence[str],
    reward_fn: RewardFn | str,
    seeds: Sequence[int] = (0, 1, 2, 3),
    batch_size: int = 8,
    tie_margin: float = 0.0,
    return_images: bool = False,
    progress: bool = True,
    **pipeline_kwargs,
) -> dict:
    """Win rate of `policy_pipe` over `reference_pipe` on every (prompt, seed), judged by `reward_fn`.

    Args:
        policy_pipe, reference_pipe: `DiffusionPipeline`s, or hub ids / local paths. `reference_pipe=None` means the
            policy pipeline with its LoRA adapters disabled (e.g. after `load_lora_weights`): no second model.
        prompts, seeds: every prompt is sampled once per seed, by both pipelines with that same seed.
        reward_fn: `reward_fn(images, prompts) -> scores` or a name for `rewards.load_reward`.
        tie_margin: score differences up to this size count as ties (0: only exact equality).
        return_images: also return `images` and `reference_images`, in the order of `comparisons`.
        **pipeline_kwargs: passed to both pipeline calls (`num_inference_steps`, `guidance_scale`, ...).

    Returns a dict with `win_rate` ((wins + 0.5 * ties) / comparisons), `wins`, `losses`, `ties`,
    `num_comparisons`, the mean rewards `reward` (policy) and `reward_reference`, and `comparisons`: one dict per
    (prompt, seed) with `prompt`, `seed`, `reward`, `reward_reference` and `outcome` ("win", "loss" or "tie").
    """
    policy = load_pipeline(policy_pipe)
    reference = None if reference_pipe is None else load_pipeline(reference_pipe)
    reward_fn = load_reward(reward_fn)
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [int(s) for _ in prompts for s in seeds]
    if not flat_prompts:
        raise ValueError("Need at least one prompt and one seed to compare.")

    images = sample_images(policy, flat_prompts, flat_seeds, batch_size, progress and "Sampling policy",
                           **pipeline_kwargs)
    # None: the policy's own family switches its adapters off (the library's one reference switch).
    with adapters_disabled(policy) if reference is None else nullcontext(reference) as ref:
        reference_images = sample_images(ref, flat_prompts, flat_seeds, batch_size,
                                         progress and "Sampling reference", **pipeline_kwargs)
    rewards = _score(reward_fn, images, flat_prompts, batch_size)
    reference_rewards = _score(reward_fn, reference_images, flat_prompts, batch_size)
    result = compare_rewards(rewards, reference_rewards, tie_margin)
    outcomes = result.pop("outcomes")
    result["comparisons"] = [
        {"prompt": p, "seed": s, "reward": r, "reward_reference": rr, "outcome": o}
        for p, s, r, rr, o in zip(flat_prompts, flat_seeds, rewards, reference_rewards, outcomes)
    ]
    if return_images:
        result["images"], result["reference_images"] = images, reference_images
    return result


def frame_strip(frames: list[Image.Image], max_frames: int = 4) -> Image.Image:
    """Up to `max_frames` frames of a video spread evenly over it (first and last included), side by side."""
    picks = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    return make_image_grid([frames[i] for i in picks], rows=1, cols=len(picks))


def comparison_grid(reference_images: list[Image.Image], images: list[Image.Image], max_columns: int = 8) -> Image.Image:
    """Reference samples on the top row, policy samples from the same seeds below them; a video (a list of frames)
    is shown as its `frame_strip`."""
    columns = min(max_columns, len(images))
    samples = [frame_strip(s) if isinstance(s, (list, tuple)) else s
               for s in [*reference_images[:columns], *images[:columns]]]
    return make_image_grid(samples, rows=2, cols=columns)


class RewardEvaluationCallback(TrainerCallback):
    """Every `eval_steps` optimizer steps (or at every `trainer.evaluate()` when `eval_steps` is None), sample fixed
    prompts with fixed seeds from the current policy and from the reference, and log

    - `eval/reward`, `eval/reward_reference`, `eval/win_rate` (logged as `eval_reward`, ... in `log_history`,
      shown under `eval/` by TensorBoard and wandb), with ties counted as half a win (see the module docstring);
    - an image grid (reference on top, policy below, same seeds) as `eval/samples` to TensorBoard and wandb when
      they are in `report_to`; for a video pipeline each sample is a strip of 4 frames across the video.

    The reference is the adapter-disabled policy for LoRA runs (no second model), otherwise the trainer's frozen
    reference denoiser swapped into the pipeline for the duration. Sampling runs on the main process in eval mode,
    under `torch.no_grad`, with its own generators and a forked RNG: training continues exactly as without the
    callback. Use it like TRL's callbacks:

        trainer.add_callback(RewardEvaluationCallback(trainer, prompts, reward_fn, seeds=[0, 1], eval_steps=100))
    """

    def __init__(
        self,
        trainer,
        prompts: Sequence[str],
        reward_fn: RewardFn | str,
        seeds: Sequence[int] = (0,),
        eval_steps: int | None = None,
        batch_size: int = 8,
        tie_margin: float = 0.0,
        num_logged_images: int = 8,
        **pipeline_kwargs,
    ):
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be a positive number of steps or None, got {eval_steps}.")
        self.trainer = trainer
        self.prompts = list(prompts)
        self.seeds = [int(s) for s in seeds]
        self.reward_fn = load_reward(reward_fn)
        self.eval_steps = eval_steps
        self.batch_size = batch_size
        self.tie_margin = tie_margin
        self.num_logged_images = num_logged_images
        self.pipeline_kwargs = pipeline_kwargs
        self._last_step = None

    def evaluate(self) -> dict:
        """Sample, score and compare now; returns the `compare_rewards` figures plus the images."""
        pipeline = self.trainer.pipeline
        flat_prompts = [p for p in self.prompts for _ in self.seeds]
        flat_seeds = [s for _ in self.prompts for s in self.seeds]
        kwargs = dict(batch_size=self.batch_size, progress=False, **self.pipeline_kwargs)
        with self.trainer.accelerator.autocast():
            images = sample_images(pipeline, flat_prompts, flat_seeds, **kwargs)
            with self.trainer.family.reference_pipeline() as reference:
                reference_images = sample_images(reference, flat_prompts, flat_seeds, **kwargs)
        result = compare_rewards(
            _score(self.reward_fn, images, flat_prompts, self.batch_size),
            _score(self.reward_fn, reference_images, flat_prompts, self.batch_size),
            self.tie_margin,
        )
        result.update(images=images, reference_images=reference_images)
        return result

    def _run(self, state, control) -> None:
        if state.global_step == self._last_step:  # several eval datasets call on_evaluate several times per step
            return
        self._last_step = state.global_step
        if not state.is_world_process_zero:
            return
        result = self.evaluate()
        # Logging resets `should_log`; keep the trainer's own loss log of this step.
        should_log = control.should_log
        self.trainer.log({f"eval_{key}": result[key] for key in ("reward", "reward_reference", "win_rate")})
        control.should_log = should_log
        if self.num_logged_images:
            grid = comparison_grid(result["reference_images"], result["images"], self.num_logged_images)
            self._log_image("eval/samples", grid, state.global_step)

    def _log_image(self, tag: str, image: Image.Image, step: int) -> None:
        report_to = self.trainer.args.report_to or []
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
                callback.tb_writer.flush()
        if "wandb" in report_to and importlib.util.find_spec("wandb") is not None:
            import wandb

            if wandb.run is not None:
                wandb.log({tag: wandb.Image(image, caption="top: reference, bottom: policy"), "train/global_step": step})

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps is not None and state.global_step % self.eval_steps == 0:
            self._run(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_steps is None:
            self._run(state, control)


class RewardHackingCallback(TrainerCallback):
    """Reward hacking made visible while it happens, for any trainer of this library (offline or online DPO, and
    the on-policy trainers built on the same `trainer.pipeline`).

    Before training and every `eval_steps` optimizer steps, the current policy samples `prompts` x `seeds` (fixed,
    so curves compare like with like) on the main process, as `RewardEvaluationCallback` does (eval mode, no grad,
    own generators, forked RNG: training continues exactly as without it), and the callback logs under `hacking/`:

    - `reward`: the training reward on these samples (`reward_fn`, either convention, scored by
      `rewards.scoring.score_images`; None scores are left out of the mean); without one, the trainer's own logged
      training reward (the latest of `train_reward_keys`: online DPO's `objective/scores`, TRL's `reward`), on its
      training prompts;
    - `heldout_reward`: a second reward that is NOT trained on (`heldout_reward_fn`, e.g. a different reward model
      or a judge trained on other data); it is what tells learning the task from learning the reward model;
    - `diversity` (within prompt, so give several seeds) and the image statistics of `hacking.py` (`colour_entropy`,
      `saturation`, `high_frequency_energy`, `grid_energy`);
    - the trainer's latest KL or importance-ratio figures where it logs them (keys with a part `kl` or `ratio`,
      e.g. `objective/kl`, `ratio/mean`, `clip_ratio`).

    After each evaluation, `hacking.hacking_alerts` compares it with the first: a warning when the training reward
    rose while the held-out one fell (by more than `heldout_tolerance`), or diversity fell below
    `(1 - diversity_drop)` of its start; with `stop_on_hacking=True` training then stops (`control.should_training_
    stop`: the checkpoint of that step is saved as usual). `history` holds every evaluation; on a resumed run the
    first evaluation is read back from the trainer's `log_history`, so the comparison still starts before training.

        trainer.add_callback(RewardHackingCallback(trainer, prompts, heldout_reward_fn="pickscore", seeds=range(4),
                                                   eval_steps=50))
    """

    def __init__(
        self,
        trainer,
        prompts: Sequence[str],
        reward_fn: RewardFn | str | None = None,
        heldout_reward_fn: RewardFn | str | None = None,
        seeds: Sequence[int] = (0, 1, 2, 3),
        eval_steps: int = 50,
        batch_size: int = 8,
        diversity_drop: float = 0.5,
        heldout_tolerance: float = 0.0,
        stop_on_hacking: bool = False,
        train_reward_keys: Sequence[str] = ("objective/scores", "reward"),
        **pipeline_kwargs,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be a positive number of steps, got {eval_steps}.")
        hacking_alerts([], diversity_drop)  # checks the fraction now, not at the first evaluation
        self.trainer, self.prompts, self.seeds = trainer, list(prompts), [int(s) for s in seeds]
        self.reward_fn = None if reward_fn is None else load_reward(reward_fn)
        self.heldout_reward_fn = None if heldout_reward_fn is None else load_reward(heldout_reward_fn)
        self.eval_steps, self.batch_size = eval_steps, batch_size
        self.diversity_drop, self.heldout_tolerance = diversity_drop, heldout_tolerance
        self.stop_on_hacking = stop_on_hacking
        self.train_reward_keys = tuple(train_reward_keys)
        self.pipeline_kwargs = pipeline_kwargs
        self.history: list[dict] = []
        self.alerts: list[str] = []

    def _from_logs(self, state) -> dict:
        """The trainer's latest training reward and KL / ratio figures, from what it logged."""
        latest = {}
        for entry in state.log_history:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and not key.startswith("hacking/") and any(
                        re.fullmatch(r"(.*_)?(kl|ratio)(_.*)?", part) for part in key.lower().split("/")):
                    latest[key] = value
            for key in self.train_reward_keys:
                if isinstance(entry.get(key), (int, float)):
                    latest["reward"] = entry[key]
        return latest

    def evaluate(self, state) -> dict:
        """Sample from the current policy, score and measure now; returns the record (no logging)."""
        flat_prompts = [p for p in self.prompts for _ in self.seeds]
        flat_seeds = [s for _ in self.prompts for s in self.seeds]
        with self.trainer.accelerator.autocast():
            images = sample_images(self.trainer.pipeline, flat_prompts, flat_seeds, batch_size=self.batch_size,
                                   progress=False, **self.pipeline_kwargs)
        record = {"step": state.global_step, **self._from_logs(state), **hacking_signals(images, flat_prompts)}
        for key, fn in (("reward", self.reward_fn), ("heldout_reward", self.heldout_reward_fn)):
            if fn is not None:  # either convention; None is unscored and left out of the mean
                scores = score_images([fn], images, flat_prompts, batch_size=self.batch_size).total
                record[key] = float(scores.nanmean()) if not scores.isnan().all() else math.nan
        return record

    def _run(self, state, control) -> None:
        alerts = self._evaluate_and_warn(state, control) if state.is_world_process_zero else []
        if self.stop_on_hacking:
            # Only the main process evaluates; every process must stop at the same step, or the others hang.
            flag = torch.tensor([float(bool(alerts))], device=self.trainer.accelerator.device)
            if self.trainer.accelerator.num_processes > 1:
                torch.distributed.broadcast(flag, src=0)
            if flag.item():
                control.should_training_stop = True

    def _evaluate_and_warn(self, state, control) -> list[str]:
        record = self.evaluate(state)
        self.history.append(record)
        should_log = control.should_log  # logging resets it; keep the trainer's own loss log of this step
        self.trainer.log({f"hacking/{key}": value for key, value in record.items() if key != "step"})
        control.should_log = should_log
        self.alerts = hacking_alerts(self.history, self.diversity_drop, self.heldout_tolerance)
        for alert in self.alerts:
            logger.warning("Possible reward hacking at step %d: %s.%s", state.global_step, alert,
                           " Stopping training (stop_on_hacking=True)." if self.stop_on_hacking else "")
        return self.alerts

    def on_train_begin(self, args, state, control, **kwargs):
        logged = [{"step": h["step"], **{k.removeprefix("hacking/"): v for k, v in h.items()
                                         if k.startswith("hacking/")}}
                  for h in state.log_history if any(k.startswith("hacking/") for k in h)]
        if logged:  # a resumed run: its history (and first evaluation) are in the checkpoint's log
            self.history = logged
        else:
            self._run(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._run(state, control)
