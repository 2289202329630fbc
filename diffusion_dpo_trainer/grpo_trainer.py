"""`DiffusionGRPOTrainer`: group-relative policy optimisation on the policy's own samples (Flow-GRPO, DanceGRPO,
MixGRPO; DDPO's DDIM step for SD), with the signature of TRL's `GRPOTrainer`.

A micro-step's prompts get `num_generations` images each from the CURRENT policy through a stochastic sampler step
(`rollout.py` with `sde.py`'s steps), which records per step the denoiser's input latents, timestep, the sample drawn
and its log-density. The rewards score the images (`rewards/scoring.py`), the advantages are formed over the batch
gathered from every process (`advantages.py`), and each trained step is one backward: the policy's output is
recomputed on the recorded latents, timestep, prompt and guidance, the log-density of the recorded sample follows,
and `losses.grpo_loss` compares it with the rollout's (the importance ratio, exactly 1 on fresh samples) and, with
`beta > 0`, with the reference's step mean (the base with the adapter off). The gradient accumulates over the trained
steps; a rollout is reused for `num_iterations` optimizer steps (`reuse.py`).
"""

import time

import datasets
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from . import losses
from .advantages import compute_advantages, nanstd
from .collators import PromptCollator
from .families.flow import FlowMatchingFamily
from .families.sd import StableDiffusionFamily
from .grpo_config import DYNAMICS, DiffusionGRPOConfig
from .reference_sync import SyncedReference
from .on_policy_trainer import OnPolicyTrainer, keep_conditioning
from .reuse import RolloutBuffer
from .rewards.scoring import score_images
from .rollout import DDIMStep, FunctionStep, group_noise_seeds, rollout, rollout_seeds
from .sde import cps_step, dance_sde_step, ddim_step, flow_sde_noise_scale, flow_sde_step

FLOW_STEPS = {"flow_sde": flow_sde_step, "dance": dance_sde_step, "cps": cps_step}


def _support(family, guidance_scale: float) -> str:
    """The family's default dynamics (DDIM with eta for the SD families, Flow-SDE for the flow-matching ones), or an
    error saying why GRPO cannot train it: no stochastic step, or a guidance scale the pipeline ignores."""
    name = type(family.pipeline).__name__
    if family.guidance(guidance_scale) is None and guidance_scale > 1:
        raise ValueError(f"guidance_scale={guidance_scale} does nothing in {name}'s sampling (no classifier-free "
                         "guidance through `guidance_scale`, no guidance embedding): use guidance_scale=1.0.")
    if isinstance(family, FlowMatchingFamily):
        return "flow_sde"
    if isinstance(family, StableDiffusionFamily):
        return "ddim"
    raise ValueError(f"GRPO does not support {name}: it has no stochastic sampler step for this family.")


class DiffusionGRPOTrainer(OnPolicyTrainer):
    """GRPO for diffusers text-to-image models, with the signature of TRL's `GRPOTrainer`.

    Args:
        model: a Hub id, a local path or a loaded pipeline of any family (docs/grpo.md, "Families": the guidance each
            trains with).
        reward_funcs: a reward or a list of them (TRL's convention: `fn(prompts=..., completions=images, **columns)`,
            or `fn(images, prompts)`, or a name for `load_reward`), combined with `args.reward_weights`; one float or
            None per image, higher is better.
        args: a `DiffusionGRPOConfig`.
        train_dataset, eval_dataset: `datasets.Dataset`s with a `prompt` column; other columns go to the rewards.
        peft_config: a LoRA config (recommended): the reference is then the base with the adapter off, no copy.
        callbacks, optimizers: as in `transformers.Trainer`.
    """

    _tag_names = ["diffusion-dpo", "grpo", "diffusers"]

    def __init__(self, model, reward_funcs, args: DiffusionGRPOConfig | None = None,
                 train_dataset: datasets.Dataset | None = None,
                 eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            args = DiffusionGRPOConfig(output_dir="diffusion-grpo")
        if not isinstance(args, DiffusionGRPOConfig):
            raise TypeError(f"`args` must be a DiffusionGRPOConfig, got {type(args).__name__}.")
        self._set_up_rewards(reward_funcs, args)
        if not self.reward_funcs:
            raise ValueError("GRPO needs at least one reward function in `reward_funcs`.")
        super().__init__(model=model, args=args, data_collator=PromptCollator(), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, optimizers=optimizers,
                         peft_config=peft_config)
        default = _support(self.family, args.guidance_scale)
        self.dynamics = args.dynamics or default
        if (self.dynamics == "ddim") != (default == "ddim"):
            raise ValueError(f"dynamics={self.dynamics!r} does not fit {type(self.family.pipeline).__name__}: use "
                             f"{'ddim' if default == 'ddim' else 'flow_sde, dance or cps'}.")
        self.noise_level = DYNAMICS[self.dynamics] if args.noise_level is None else args.noise_level
        pipeline = self.family.pipeline
        if self.dynamics == "ddim" and not isinstance(pipeline.scheduler, DDIMScheduler):
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)  # as DDPO samples SD
        elif self.dynamics != "ddim" and not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            # Sana's DPM-Solver and Wan's UniPC have no one-step transition to make stochastic: Euler on the flow
            # sigmas of the same shift (the family's training schedule) instead.
            pipeline.scheduler = self.family.training_scheduler()
        # Steps whose transition is deterministic by construction, whatever the noise: CPS's last step (to sigma 0)
        # and DDIM's last step when it lands on alpha = 1.
        last = args.num_inference_steps - 1
        self._deterministic = {last} if self.dynamics == "cps" or (
            self.dynamics == "ddim" and float(pipeline.scheduler.final_alpha_cumprod) == 1.0) else set()
        if self.beta > 0 and not self.is_lora:
            self.family.freeze_reference_copy()  # the KL's reference: with LoRA, the base with the adapter off
        if args.sync_ref_model:
            self.synced_reference = SyncedReference(self)
            self.add_callback(self.synced_reference)
        self._buffer = RolloutBuffer(args.num_iterations)
        self._eval_batches = 0

    def _resolve_loss(self, args):
        return [], False, None  # GRPO's loss is its own (losses.grpo_loss); no DPO loss, no reference for one

    # ----- which steps are stochastic and trained -----------------------------------------------------------------
    def sde_window(self, step: int) -> list[int] | None:
        """The stochastic (and trained) steps of the rollout at optimizer step `step`, or None when every step is
        stochastic. 'sliding' moves the window by `sde_window_stride` every `sde_window_shift_every` steps and rolls
        back to `sde_window_start` after the last place that fits (MixGRPO's progressive strategy): a function of the
        step only, so a resumed run slides the same way."""
        args = self.args
        if not args.sde_window_size:
            return None
        start = args.sde_window_start
        if args.sde_window_mode == "sliding":
            places = args.num_inference_steps - args.sde_window_size - start + 1
            start += (step // args.sde_window_shift_every * args.sde_window_stride) % places
        return list(range(start, start + args.sde_window_size))

    def trained_steps(self, step: int) -> list[int]:
        """The steps trained on the rollout of optimizer step `step`: the window, or the first
        int(num_inference_steps * timestep_fraction) steps (flow_grpo), less the deterministic ones."""
        window = self.sde_window(step)
        args = self.args
        candidates = window if window is not None else range(int(args.num_inference_steps * args.timestep_fraction))
        steps = [j for j in candidates if j not in self._deterministic]
        if not steps:
            raise ValueError(f"No step to train: timestep_fraction={args.timestep_fraction} of num_inference_steps="
                             f"{args.num_inference_steps} (or the window) leaves no stochastic step.")
        return steps

    def _sampler_step(self, stochastic):
        if self.dynamics == "ddim":
            return DDIMStep(self.noise_level, stochastic)
        return FunctionStep(FLOW_STEPS[self.dynamics], self.noise_level, stochastic)

    # ----- rollout -> rewards -> advantages -----------------------------------------------------------------------
    def _score(self, inputs: dict, images: list, flat_prompts: list[str]):
        """Scores of this process's images, gathered: (global per-function rewards, this process's slice)."""
        n = self.args.num_generations
        columns = {k: [v for v in values for _ in range(n)] for k, values in inputs.items() if k != "prompt"}
        scores = score_images(self.reward_funcs, images, flat_prompts, self.reward_func_names, self.reward_weights,
                              {"trainer_state": self.state, **columns})
        gathered = self.accelerator.gather(scores.per_function.to(self.accelerator.device)).cpu()
        first = self.accelerator.process_index * len(images)
        return gathered, slice(first, first + len(images))

    def _log_rewards(self, store, per_function: torch.Tensor, advantages) -> None:
        """TRL's reward metrics over the global batch."""
        rewards = advantages.rewards
        store["reward"].append(torch.nanmean(rewards))
        store["reward_std"].append(torch.nanmean(nanstd(rewards.view(-1, self.args.num_generations), dim=1)))
        store["frac_reward_zero_std"].append(advantages.frac_reward_zero_std)
        for k, name in enumerate(self.reward_func_names):
            store[f"rewards/{name}/mean"].append(torch.nanmean(per_function[:, k]).float())
            store[f"rewards/{name}/std"].append(nanstd(per_function[:, k]).float())

    def _generate(self, inputs: dict[str, list], key: tuple[int, ...], step: int) -> dict:
        """Sample the prompts' groups with the stochastic step, score them, and keep what training recomputes: the
        trajectory's trained steps, the advantages, and the conditioning the rollout sampled with (one row per prompt,
        so training and the steps that reuse the rollout encode nothing)."""
        args, n, prompts = self.args, self.args.num_generations, inputs["prompt"]
        store, start = self._metrics["train"], time.perf_counter()
        flat_prompts = [p for p in prompts for _ in range(n)]
        first = self.accelerator.process_index * len(prompts)  # this process's place in the global batch
        noise_seeds = group_noise_seeds(args.seed, key, first, len(prompts), n) if args.init_same_noise else None
        with self.accelerator.autocast(), torch.no_grad():
            conditioning = self._conditioning(list(prompts))
            result = rollout(self.family, flat_prompts, rollout_seeds(args.seed, key, first, len(prompts), n),
                             self.resolution, args.generation_batch_size, step=self._sampler_step(self.sde_window(step)),
                             record=True, conditioning=conditioning, noise_seeds=noise_seeds,
                             num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
        sampled = time.perf_counter()
        per_function, own = self._score(inputs, result.images, flat_prompts)
        advantages = compute_advantages(per_function, n, reward_weights=self.reward_weights,
                                        scale_rewards=args.scale_rewards,
                                        multi_objective_aggregation=args.multi_objective_aggregation,
                                        advantage_clip=args.advantage_clip)
        self._log_rewards(store, per_function, advantages)
        trained = self.trained_steps(step)
        trajectory = result.trajectory
        batch = {"prompt": flat_prompts, "steps": trained, "advantages": advantages.advantages[own],
                 **self.family.generated_conditioning(len(flat_prompts), self.resolution)}  # e.g. SDXL's time ids
        batch.update(keep_conditioning(*conditioning))  # both branches: training guides as the rollout did
        for name in ("latents", "next_latents", "timesteps", "log_prob", "prev_sample", "sigma", "sigma_next",
                     "alpha", "alpha_prev"):
            if name in trajectory:
                batch[name] = trajectory[name][:, trained].contiguous()
        store["time/sampling"].append(torch.tensor(sampled - start))
        store["time/rewards"].append(torch.tensor(time.perf_counter() - sampled))
        return batch

    # ----- the step -----------------------------------------------------------------------------------------------
    def _guided_output(self, denoiser, latents, timesteps, conditioning, negative):
        """The model output the rollout's step saw: the family's `guided_prediction` (its pipeline's guidance, the
        unconditional branch detached as flow_grpo does) at the configured scale."""
        return self.family.guided_prediction(denoiser, latents.to(self.weight_dtype), timesteps, conditioning, negative,
                                             self.args.guidance_scale)

    def _model_output(self, denoiser, batch: dict, j: int, conditioning: tuple) -> torch.Tensor:
        """The model output of trained step j as the rollout's step saw it, in the pipeline's latent layout: the
        recorded latents go to `predict` in the family's training layout (FLUX's packed tokens unpacked) with
        `_training_conditioning`, and the output comes back packed."""
        family = self.family
        conditioning, negative = conditioning
        latents = family.sampled_latents(batch["latents"][:, j], self.resolution)
        output = self._guided_output(denoiser, latents, batch["timesteps"][:, j], conditioning, negative)
        return family.pipeline_latents(output)

    def _transition(self, batch: dict, j: int, output: torch.Tensor):
        """The log-density of the recorded sample of trained step j under `output` (sde.py), and the KL's scale."""
        latents = batch["latents"][:, j]
        sample = batch["prev_sample"][:, j] if "prev_sample" in batch else batch["next_latents"][:, j]
        if self.dynamics == "ddim":
            step = ddim_step(latents, output, batch["alpha"][:, j], batch["alpha_prev"][:, j], self.noise_level,
                             prediction_type=self.family.pipeline.scheduler.config.prediction_type,
                             clip_sample_range=self._clip_range(), prev_sample=sample)
            return step, step.std
        sigma, sigma_next = batch["sigma"][:, j], batch["sigma_next"][:, j]
        step = FLOW_STEPS[self.dynamics](latents, output, sigma, sigma_next, self.noise_level, prev_sample=sample)
        if self.dynamics == "flow_sde":
            return step, flow_sde_noise_scale(sigma, sigma_next, self.noise_level, step.mean)
        return step, (self.noise_level if self.dynamics == "dance" else step.std)

    def _clip_range(self):
        config = self.family.pipeline.scheduler.config
        return config.clip_sample_range if config.clip_sample else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        batch, fresh = self._buffer.batch(step, lambda micro: self._generate(inputs, (0, step, micro), step))
        if not fresh:
            for name in ("time/sampling", "time/rewards"):
                self._metrics["train"][name].append(torch.tensor(0.0))
        if list(inputs["prompt"]) != batch["prompt"][:: self.args.num_generations]:
            raise RuntimeError("Internal error: the reused samples belong to other prompts than this step's.")
        start = time.perf_counter()
        conditioning = self._training_conditioning(batch)
        loss = 0.0
        for j in range(len(batch["steps"])):  # one backward per trained step: the gradient accumulates
            loss = loss + super().training_step(model, {"batch": batch, "j": j, "conditioning": conditioning},
                                                num_items_in_batch)
        self._metrics["train"]["time/training"].append(torch.tensor(time.perf_counter() - start))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The GRPO loss of one trained step, divided by the number of trained steps (their mean)."""
        batch, j, conditioning = inputs["batch"], inputs["j"], inputs["conditioning"]
        args = self.args
        with self.accelerator.autocast():
            step, kl_std = self._transition(batch, j, self._model_output(model, batch, j, conditioning))
            ref_mean = None
            if self.beta > 0:
                with torch.no_grad(), self.family.reference() as reference:
                    ref_step, _ = self._transition(batch, j, self._model_output(reference, batch, j, conditioning))
                ref_mean = ref_step.mean
        loss, metrics = losses.grpo_loss(step.log_prob, batch["log_prob"][:, j], batch["advantages"], args.epsilon,
                                         args.epsilon_high, self.beta, step.mean, ref_mean, kl_std)
        store = self._metrics["train" if model.training else "eval"]
        for key, value in metrics.items():
            store[key].append(value)
        store[f"importance_ratio/step_{batch['steps'][j]}"].append(metrics["importance_ratio/mean"])
        loss = loss / len(batch["steps"])
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Sample the eval prompts with the deterministic sampler (`eval_num_inference_steps`, fixed seeds per
        evaluation batch) and log their rewards (`eval_reward`, ...); there is no loss to report."""
        args, n = self.args, self.args.num_generations
        prompts = [p for p in inputs["prompt"] for _ in range(n)]
        first = self.accelerator.process_index * len(inputs["prompt"])
        seeds = rollout_seeds(args.seed, (1, self._eval_batches), first, len(inputs["prompt"]), n)
        self._eval_batches += 1
        with self.accelerator.autocast(), torch.no_grad():
            result = rollout(self.family, prompts, seeds, self.resolution, args.generation_batch_size,
                             conditioning=self._conditioning(list(inputs["prompt"])),
                             num_inference_steps=args.eval_num_inference_steps, guidance_scale=args.guidance_scale)
        per_function, _ = self._score(inputs, result.images, prompts)
        advantages = compute_advantages(per_function, n, reward_weights=self.reward_weights,
                                        scale_rewards=args.scale_rewards,
                                        multi_objective_aggregation=args.multi_objective_aggregation)
        self._log_rewards(self._metrics["eval"], per_function, advantages)
        return None, None, None
