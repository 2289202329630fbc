"""`DiffusionNFTTrainer`: DiffusionNFT (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT), online reinforcement on
the forward process, on the on-policy layer.

A rollout is: the old policy samples `num_generations` images per prompt with the pipeline's own deterministic
scheduler (no trajectory: only the clean latents x0 are kept; the official code samples with its "old" adapter,
train_nft_sd3.py:640), the rewards score them (`rewards/scoring.py`), the gathered rewards become group advantages and
each advantage an optimality weight r in [0, 1] (`advantages.py`). Training re-noises each x0 at
`config.num_train_timesteps` of the rollout's timesteps (a random subset per image and use), with fresh
forward-process noise per image and timestep that the policy, the old policy and the base model (adapter off) all see,
all three conditioned on the prompts' conditioning the rollout sampled with (encoded once per rollout and kept in its
batch, one row per prompt; without guidance's negative: training does not guide), and minimises `losses.nft_loss` on
the three predictions' clean-sample estimates plus `beta * losses.prediction_kl` to the base. The old policy is a
second LoRA adapter ("old"), moved towards the policy by the EMA schedule of `old_policy.py` once per rollout, after
its last optimizer step; it never touches the base weights.
"""

import os
import time

import datasets
import torch
from transformers import TrainerCallback

from . import losses
from .adapter_copy import adapter_pairs, add_adapter_copy, load_tensors, save_tensors
from .advantages import compute_advantages, nft_optimality
from .collators import PromptCollator
from .nft_config import DiffusionNFTConfig
from .old_policy import ema_update_, nft_ema_decay
from .on_policy_trainer import OnPolicyTrainer, keep_conditioning
from .reuse import RolloutBuffer
from .rewards.scoring import score_images
from .rollout import rollout, rollout_seeds

OLD_ADAPTER = "old"
OLD_POLICY_WEIGHTS = "old_policy.safetensors"


class _OldPolicyUpdate(TrainerCallback):
    """old <- decay * old + (1 - decay) * policy after the last optimizer step of each rollout (the paper's epoch),
    with decay from the schedule at the number of optimizer steps so far (train_nft_sd3.py:1034-1039)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.num_iterations == 0:
            decay = nft_ema_decay(state.global_step, *args.ema_schedule)
            ema_update_(*zip(*self.trainer.old_policy_pairs()), decay=decay)
            self.trainer._metrics["train"]["nft/ema_decay"].append(torch.tensor(decay))


class DiffusionNFTTrainer(OnPolicyTrainer):
    """DiffusionNFT with the signature of TRL's `GRPOTrainer`.

    Args:
        model: a hub id, a local path or a `DiffusionPipeline`.
        reward_funcs: a reward or a list of them, as for `DiffusionOnlineDPOTrainer` (a callable in TRL's or our
            convention, or a name for `load_reward`), combined by `args.reward_weights` and
            `args.multi_objective_aggregation`. One float (or None: not scored) per image; higher is better.
        args: a `DiffusionNFTConfig`.
        train_dataset: a `datasets.Dataset` with a `prompt` column; other columns go to the rewards.
        peft_config: a `peft.LoraConfig` (required): the base model is the adapter-disabled denoiser and the old
            policy a second adapter.
        callbacks, optimizers: as in `transformers.Trainer`.
    """

    _tag_names = ["diffusion-dpo", "diffusion-nft", "diffusers"]

    def __init__(self, model, reward_funcs, args: DiffusionNFTConfig | None = None,
                 train_dataset: datasets.Dataset | None = None, eval_dataset=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            args = DiffusionNFTConfig(output_dir="diffusion-nft")
        if not isinstance(args, DiffusionNFTConfig):
            raise TypeError(f"`args` must be a DiffusionNFTConfig, got {type(args).__name__}.")
        if peft_config is None:
            raise ValueError("DiffusionNFTTrainer needs a `peft_config`: the old policy is a second LoRA adapter and "
                             "the regulariser's base model the adapter-disabled denoiser (a full fine-tune would need "
                             "two frozen copies).")
        if eval_dataset is not None:
            raise ValueError("DiffusionNFTTrainer takes no `eval_dataset` (its loss says nothing about quality): "
                             "evaluate rewards with `RewardEvaluationCallback` or `evaluate_protocol`.")
        if reward_funcs is None:
            raise ValueError("`reward_funcs` must hold at least one reward (a callable or a `load_reward` name).")
        self._set_up_rewards(reward_funcs, args)
        if not self.reward_funcs:
            raise ValueError("`reward_funcs` must hold at least one reward (a callable or a `load_reward` name).")
        super().__init__(model=model, args=args, data_collator=PromptCollator(), train_dataset=train_dataset,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config)
        if args.nft_timesteps == "schedule":
            self.family.schedule_timesteps(torch.zeros(1))  # a family that cannot map them is refused now, by name
        add_adapter_copy(self.family.denoiser, OLD_ADAPTER, torch.float32)  # the old policy starts as the policy
        self.add_callback(_OldPolicyUpdate(self))
        self._buffer = RolloutBuffer(args.num_iterations)

    def old_policy_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(old policy parameter, policy parameter) for every LoRA parameter of the policy's adapter."""
        return adapter_pairs(self.accelerator.unwrap_model(self.model), OLD_ADAPTER)

    def _resolve_loss(self, args):
        return [], False, None  # NFT's loss is its own (losses.nft_loss); `beta` is the regulariser's weight, 0 allowed

    def _card_loss_type(self):
        return "nft"

    def _card_hyperparameters(self) -> dict:
        args = self.args
        flat, uprate, uphold = args.ema_schedule
        return {"nft_beta": args.nft_beta, "kl_weight (beta)": args.beta, "num_generations": args.num_generations,
                "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "advantage_clip": args.advantage_clip, "scale_rewards": args.scale_rewards,
                "timestep_fraction": args.timestep_fraction, "ema_flat": flat, "ema_uprate": uprate,
                "ema_uphold": uphold}

    # ----- rollout -> score -> advantages -------------------------------------------------------------------------
    def _sample(self, prompts: list[str], seeds: list[int], conditioning: tuple):
        """The old policy's images and clean latents, one per (prompt, seed), sampled with `conditioning` (one row per
        group, `_conditioning`), and the scheduler's timesteps."""
        args = self.args
        with self.accelerator.autocast(), self.family.adapter_active(OLD_ADAPTER):
            result = rollout(self.family, prompts, seeds, self.resolution, args.generation_batch_size,
                             conditioning=conditioning, num_inference_steps=args.num_inference_steps,
                             guidance_scale=args.guidance_scale)
        return result.images, result.latents, self.family.pipeline.scheduler.timesteps.float().cpu()

    def _generate(self, inputs: dict[str, list], key: tuple[int, ...]) -> dict:
        """Sample and score the batch's prompts; the batch the NFT loss trains on until the next rollout."""
        args, store, device = self.args, self._metrics["train"], self.accelerator.device
        n, prompts, start = args.num_generations, inputs["prompt"], time.perf_counter()
        flat_prompts = [p for p in prompts for _ in range(n)]
        first = self.accelerator.process_index * len(prompts)  # this process's place in the global batch
        conditioning = self._conditioning(list(prompts))
        images, latents, schedule = self._sample(flat_prompts, rollout_seeds(args.seed, key, first, len(prompts), n),
                                                 conditioning)
        sampled = time.perf_counter()
        columns = {k: [v for v in values for _ in range(n)] for k, values in inputs.items() if k != "prompt"}
        scores = score_images(self.reward_funcs, images, flat_prompts, self.reward_func_names, self.reward_weights,
                              {"trainer_state": self.state, **columns})
        # Advantages from the GATHERED rewards (groups may straddle processes), then this process's slice.
        all_scores = self.accelerator.gather(scores.per_function.to(device)).cpu()
        result = compute_advantages(all_scores, n, reward_weights=self.reward_weights,
                                    scale_rewards=args.scale_rewards,
                                    multi_objective_aggregation=args.multi_objective_aggregation)
        local = slice(self.accelerator.process_index * len(images), (self.accelerator.process_index + 1) * len(images))
        advantages = result.advantages[local]
        store["time/sampling"].append(torch.tensor(sampled - start))
        store["time/rewards"].append(torch.tensor(time.perf_counter() - sampled))
        _store_mean_std(store, "reward", result.rewards)
        for k, name in enumerate(self.reward_func_names):
            _store_mean_std(store, f"rewards/{name}", all_scores[:, k].float(), sep="/")
        store["frac_reward_zero_std"].append(result.frac_reward_zero_std)
        batch = {"prompt": flat_prompts, "latents": latents, "advantages": advantages,
                 "optimality": nft_optimality(advantages, args.advantage_clip),
                 "schedule": schedule.expand(len(images), -1).contiguous(),
                 **keep_conditioning(conditioning[0])}  # no negative: training does not guide
        batch.update(self.family.generated_conditioning(len(images), self.resolution))  # e.g. SDXL's time ids
        return batch

    def _training_timesteps(self, batch: dict) -> torch.Tensor:
        """(images, num_train_timesteps) timesteps for this use of the rollout, drawn for the global batch (so N
        processes train what one would): a random subset of the rollout's timesteps per image (the paper's
        per-sample permutation, train_nft_sd3.py:810-815), or draws from the family's training distribution."""
        args, world = self.args, self.accelerator.num_processes
        count, k = len(batch["latents"]), args.num_train_timesteps
        if args.nft_timesteps == "training":
            draws = self.family.sample_timesteps(world * count * k, self.accelerator.device)
            return self._own_share(draws.view(world * count, k).cpu())
        schedule = batch["schedule"]
        order = self._own_share(torch.rand(world * count, schedule.shape[1]).argsort(dim=1))[:, :k]
        return self.family.schedule_timesteps(schedule.gather(1, order).reshape(-1)).view(count, k)

    # ----- the step -----------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        step = self.state.global_step
        batch, fresh = self._buffer.batch(step, lambda micro: self._generate(inputs, (0, step, micro)))
        if not fresh:
            for name in ("time/sampling", "time/rewards"):
                self._metrics["train"][name].append(torch.tensor(0.0))
        n = self.args.num_generations
        if list(inputs["prompt"]) != batch["prompt"][::n]:
            raise RuntimeError("Internal error: the reused samples belong to other prompts than this step's.")
        start = time.perf_counter()
        timesteps = self._training_timesteps(batch)
        conditioning, _ = self._training_conditioning(batch)
        # One backward per trained timestep (the official gradient accumulation over timesteps): memory of one.
        loss = sum(super(DiffusionNFTTrainer, self).training_step(
                       model, {**batch, "timesteps": timesteps[:, k], "conditioning": conditioning}, num_items_in_batch)
                   for k in range(timesteps.shape[1]))
        self._metrics["train"]["time/training"].append(torch.tensor(time.perf_counter() - start))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The NFT loss at one timestep per image: fresh noise, shared by policy, old policy and base, all three on
        the micro-step's `conditioning` (`_training_conditioning`)."""
        family, x0, timesteps = self.family, inputs["latents"], inputs["timesteps"]
        conditioning = inputs["conditioning"]
        world = self.accelerator.num_processes
        noise = self._own_share(torch.randn((world * x0.shape[0], *x0.shape[1:]), device=x0.device, dtype=x0.dtype))
        noisy, _ = family.noisy_latents_and_target(x0, noise, timesteps)
        with self.accelerator.autocast():
            with torch.no_grad(), family.adapter_active(OLD_ADAPTER) as old:
                old_prediction = family.predict(old, noisy, timesteps, conditioning)
            ref_prediction = None
            if self.beta > 0:
                with torch.no_grad(), family.reference() as base:
                    ref_prediction = family.predict(base, noisy, timesteps, conditioning)
            prediction = family.predict(model, noisy, timesteps, conditioning)
        loss, metrics = losses.nft_loss(family.clean_estimate(noisy, prediction, timesteps),
                                        family.clean_estimate(noisy, old_prediction, timesteps), x0,
                                        inputs["optimality"].to(x0.device), self.args.nft_beta,
                                        loss_scale=self.args.advantage_clip)
        if ref_prediction is not None:
            kl = losses.prediction_kl(prediction.float(), ref_prediction.float())
            metrics["kl"] = kl.detach()
            loss = loss + self.beta * kl
        store = self._metrics["train"]
        for key, value in metrics.items():
            store[key].append(value)
        loss = loss / self.args.num_train_timesteps
        return (loss, metrics) if return_outputs else loss

    # ----- checkpoints --------------------------------------------------------------------------------------------
    def _save_method_state(self, folder: str) -> None:
        """The old policy (the samples still to be reused are `OnPolicyTrainer`'s part of the checkpoint)."""
        if self.args.should_save:
            save_tensors([old for old, _ in self.old_policy_pairs()], os.path.join(folder, OLD_POLICY_WEIGHTS))

    def _load_method_state(self, folder: str) -> None:
        load_tensors([old for old, _ in self.old_policy_pairs()], os.path.join(folder, OLD_POLICY_WEIGHTS),
                     "a DiffusionNFT checkpoint holds its old policy")

def _store_mean_std(store, name: str, values: torch.Tensor, sep: str = "_") -> None:
    """Mean and standard deviation of the scored (non-NaN) values, as TRL names them (`reward`, `reward_std`,
    `rewards/<name>/mean`, `rewards/<name>/std`)."""
    values = values[~values.isnan()].double()
    if not values.numel():
        return
    mean_name = f"{name}/mean" if sep == "/" else name
    store[mean_name].append(values.mean())
    store[f"{name}{sep}std"].append(values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(()))
