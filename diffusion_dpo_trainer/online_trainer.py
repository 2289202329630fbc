"""`DiffusionOnlineDPOTrainer`: Diffusion-DPO on the current policy's own samples, scored as training goes.

A micro-step is rollout -> score -> pair -> the offline step: the prompts of the batch get `num_images_per_prompt`
images each from the CURRENT policy (`rollout.py`, with seeds derived from the run's seed, the step and the image's
place in the global batch), the rewards score them (`rewards/scoring.py`) or a pairwise judge compares them, the
pairs are chosen (`pairing.py`), and the offline trainer's step runs on the sampled latents (no VAE round trip): one
noise and timestep per pair shared by winner, loser, policy and reference. A rollout is reused for `num_iterations`
optimizer steps (`reuse.py`). The prompts are encoded once per rollout: the batch keeps their conditioning, one row per
prompt (a pair's two images share its prompt), and the offline step reads it instead of encoding again.

Every prompt has a fixed number of pair slots (1 for best_vs_worst), so every process forwards the same shapes and
draws its noise in lockstep; a slot whose images tie (or miss the gap) is forwarded but left out of the loss. Each
process's loss is weighted by its share of the global pairs, so the gradient is the mean over all pairs whatever the
process count, and a step without any pair on any process changes nothing.
"""

import math
import time
import warnings

import datasets
import torch
from transformers import TrainerCallback

from . import losses
from .collators import PromptCollator
from .on_policy_trainer import OnPolicyTrainer, keep_conditioning
from .online_config import DiffusionOnlineDPOConfig
from .pairing import judge_slots, pair_slots
from .reference_sync import SyncedReference
from .reuse import RolloutBuffer
from .rewards.scoring import score_images
from .rollout import rollout, rollout_seeds


class _NoPairWatch(TrainerCallback):
    """Warns at the first optimizer step that formed no pair, and stops after `patience` such steps in a row: a reward
    that scores nothing must not "train" at loss 0 unnoticed. The trainer adds each micro-step's global pairs."""

    def __init__(self, patience: int | None):
        self.patience, self.pairs, self.streak, self.warned = patience, 0, 0, False

    def on_step_end(self, args, state, control, **kwargs):
        self.streak, self.pairs = (0 if self.pairs else self.streak + 1), 0
        if self.streak and not self.warned:
            self.warned = True
            warnings.warn(f"Step {state.global_step} formed no preference pair on any process (every slot tied, "
                          "missed min_score_gap or was unscored): the step left the model unchanged.")
        if self.patience is not None and self.streak >= self.patience:
            raise ValueError(f"No preference pair in {self.patience} consecutive optimizer steps (no_pair_patience), "
                             f"up to step {state.global_step}: the rewards do not rank the sampled images (a constant "
                             "reward, or None for every image?), so training cannot change the model.")


class DiffusionOnlineDPOTrainer(OnPolicyTrainer):
    """On-policy Diffusion-DPO with the signature of TRL's `OnlineDPOTrainer`.

    Args:
        model, ref_model, peft_config, callbacks, optimizers: as in `DiffusionDPOTrainer`. With LoRA and no
            `sync_ref_model`, the reference is the adapter-disabled denoiser (no copy); with `sync_ref_model`, a
            second adapter ('ref') on the same denoiser.
        reward_funcs: a reward or a list of them, combined with `args.reward_weights`. A reward is a callable, or a
            name for `load_reward` ("pickscore", "clip:<id or path>", "package.module:function"). A callable that takes
            `completions` (or only `**kwargs`) is called TRL's way: `fn(prompts=..., completions=images,
            trainer_state=..., **other dataset columns)`; any other callable as `fn(images, prompts)`. Either returns
            one float (or None: not scored) per image; higher is better.
        judge: instead of rewards, a pairwise judge with TRL's interface: `judge.judge(prompts, [[image_a, image_b],
            ...])` returns, per pair, 0 or 1 (the better image) or -1 (no decision, no pair).
        train_dataset, eval_dataset: `datasets.Dataset`s with a `prompt` column; other columns go to the rewards.
    """

    _tag_names = ["diffusion-dpo", "online-dpo", "diffusers"]

    def __init__(self, model, ref_model=None, reward_funcs=None, judge=None,
                 args: DiffusionOnlineDPOConfig | None = None, train_dataset: datasets.Dataset | None = None,
                 eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            args = DiffusionOnlineDPOConfig(output_dir="diffusion-online-dpo")
        if not isinstance(args, DiffusionOnlineDPOConfig):
            raise TypeError(f"`args` must be a DiffusionOnlineDPOConfig, got {type(args).__name__}.")
        if (reward_funcs is None) == (judge is None):
            raise ValueError("Pass exactly one of `reward_funcs` (scores per image) and `judge` (a pairwise judge).")
        if judge is not None:
            if not callable(getattr(judge, "judge", None)):
                raise TypeError("`judge` must have a `judge(prompts, completions)` method (TRL's pairwise judge).")
            if args.num_images_per_prompt % 2:
                raise ValueError(f"With a judge, images are judged two by two: num_images_per_prompt must be even, "
                                 f"got {args.num_images_per_prompt}.")
        self._set_up_rewards(reward_funcs, args)
        self.judge = judge
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=PromptCollator(),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config)
        if not self.paired:
            raise ValueError(f"loss_type {args.loss_type!r} needs labelled images; online DPO trains on pairs.")
        if args.sync_ref_model:
            if not losses.needs_reference(self.loss_types):
                raise ValueError(f"sync_ref_model: loss_type {args.loss_type!r} uses no reference model.")
            if self.is_lora and ref_model is not None:
                raise ValueError("sync_ref_model with LoRA keeps the reference as a second adapter of the policy's "
                                 "denoiser: do not pass `ref_model`.")
            self.synced_reference = SyncedReference(self)
            self.add_callback(self.synced_reference)
        self._no_pairs = _NoPairWatch(args.no_pair_patience)
        self.add_callback(self._no_pairs)
        self._buffer = RolloutBuffer(args.num_iterations)
        self._eval_batches = 0

    def sync_reference(self, alpha: float | None = None) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (alpha: `ref_model_mixup_alpha`)."""
        self.synced_reference.sync(self.args.ref_model_mixup_alpha if alpha is None else alpha)

    # ----- rollout -> score -> pair -------------------------------------------------------------------------------
    def _sample(self, prompts: list[str], seeds: list[int], conditioning: tuple) -> tuple[list, torch.Tensor]:
        """The current policy's images and final latents, one per (prompt, seed), sampled with `conditioning` (one row
        per group of consecutive prompts, `_conditioning`)."""
        args = self.args
        with self.accelerator.autocast():
            result = rollout(self.family, prompts, seeds, self.resolution, args.generation_batch_size,
                             conditioning=conditioning, num_inference_steps=args.num_inference_steps,
                             guidance_scale=args.guidance_scale)
        return result.images, result.latents

    def _generate(self, inputs: dict[str, list], key: tuple[int, ...], mode: str) -> dict:
        """Sample, score and pair the batch's prompts; the batch the offline step trains on."""
        n, prompts, start = self.args.num_images_per_prompt, inputs["prompt"], time.perf_counter()
        flat_prompts = [p for p in prompts for _ in range(n)]
        first = self.accelerator.process_index * len(prompts)  # this process's place in the global batch
        conditioning = self._conditioning(list(prompts))
        images, latents = self._sample(flat_prompts, rollout_seeds(self.args.seed, key, first, len(prompts), n),
                                       conditioning)
        if self.judge is not None:
            scores, slots = None, judge_slots(self.judge, prompts, images, n)
        else:
            columns = {k: [v for v in values for _ in range(n)] for k, values in inputs.items() if k != "prompt"}
            scores = score_images(self.reward_funcs, images, flat_prompts, self.reward_func_names,
                                  self.reward_weights, {"trainer_state": self.state, **columns})
            slots = pair_slots(scores.total, n, self.args.pair_strategy, self.args.min_score_gap)
        count = len(slots.group)
        batch = {"prompt": [prompts[g] for g in slots.group], "chosen_latents": latents[slots.chosen],
                 "rejected_latents": latents[slots.rejected], "valid": slots.valid,
                 **keep_conditioning(conditioning[0])}  # no negative: the DPO step does not guide
        generated = self.family.generated_conditioning(count, self.resolution)  # e.g. SDXL's time ids
        batch.update({f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in generated.items()})
        # Global statistics (every process computes the same), so they average like the trainer's other metrics.
        gather, store = self.accelerator.gather, self._metrics[mode]
        all_valid = gather(slots.valid.double().to(self.accelerator.device)).cpu() > 0
        batch["num_pairs"] = int(all_valid.sum())
        store["objective/no_pair_fraction"].append(
            torch.tensor(1.0 - all_valid.view(-1, count // len(prompts)).any(dim=1).double().mean().item()))
        if scores is not None:
            all_scores = gather(scores.per_function.to(self.accelerator.device)).cpu()
            _store_spread(store, "objective/scores", gather(scores.total.to(self.accelerator.device)).cpu())
            for k, name in enumerate(self.reward_func_names):
                _store_spread(store, f"objective/scores/{name}", all_scores[:, k])
            margins = torch.where(slots.valid, scores.total[slots.chosen] - scores.total[slots.rejected], math.nan)
            all_margins = gather(margins.to(self.accelerator.device)).cpu()
            if (~all_margins.isnan()).any():
                store["objective/scores_margin"].append(all_margins.nanmean())
        store["time/generation"].append(torch.tensor(time.perf_counter() - start))
        return batch

    # ----- the step -----------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()  # as Trainer.training_step does, also for a step that has no pair to train on
        step = self.state.global_step
        batch, fresh = self._buffer.batch(step, lambda micro: self._generate(inputs, (0, step, micro), "train"))
        if not fresh:
            self._metrics["train"]["time/generation"].append(torch.tensor(0.0))
        if list(inputs["prompt"]) != batch["prompt"][:: len(batch["prompt"]) // len(inputs["prompt"])]:
            raise RuntimeError("Internal error: the reused samples belong to other prompts than this step's.")
        self._no_pairs.pairs += batch["num_pairs"]
        start = time.perf_counter()
        if batch["num_pairs"] == 0:  # no pair on any process: no forward, no backward, no update
            loss = torch.zeros((), device=self.args.device)
        else:
            loss = super().training_step(model, batch, num_items_in_batch)
        self._metrics["train"]["time/training"].append(torch.tensor(time.perf_counter() - start))
        return loss

    def _denoising_errors(self, model, inputs):
        """The offline errors of every slot, then only the pairs: slots without a pair are left out of the loss."""
        policy_mse, ref_mse = super()._denoising_errors(model, inputs)
        keep = torch.cat([inputs["valid"], inputs["valid"]])
        return policy_mse[keep], None if ref_mse is None else ref_mse[keep]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        local = int(inputs["valid"].sum())
        if local == 0:  # ties only here, pairs elsewhere: take part in the backward with a zero loss
            with self.accelerator.autocast():
                policy_mse, _ = super()._denoising_errors(model, inputs)
            loss = policy_mse.sum() * 0.0
            return (loss, {}) if return_outputs else loss
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Each process averages its own pairs and DDP averages the processes: weigh by the share of pairs.
        scale = local * self.accelerator.num_processes / inputs["num_pairs"]
        return (output[0] * scale, output[1]) if return_outputs else output * scale

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Sample and score the eval prompts with the current policy (fixed seeds per evaluation batch), and the
        DPO loss on their pairs."""
        batch = self._generate(inputs, (1, self._eval_batches), "eval")
        self._eval_batches += 1
        if batch["num_pairs"] == 0:
            return torch.tensor(math.nan, device=self.args.device), None, None
        return super().prediction_step(model, batch, prediction_loss_only, ignore_keys)


def _store_spread(store, name: str, values: torch.Tensor) -> None:
    """Mean and standard deviation of the scored (non-NaN) values."""
    values = values[~values.isnan()]
    if values.numel():
        store[name].append(values.mean())
        store[f"{name.replace('objective/scores', 'objective/scores_std', 1)}"].append(
            values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(()))
