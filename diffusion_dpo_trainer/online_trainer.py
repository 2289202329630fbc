"""`DiffusionOnlineDPOTrainer`: Diffusion-DPO on the current policy's own samples, scored as training goes.

A micro-step: the prompts of the batch -> `num_images_per_prompt` images each from the CURRENT policy (eval mode, no
grad, one seed per image derived from the run's seed, the step and the image's place in the global batch, so a run
is reproducible, resumes exactly and N processes sample what one process would) -> rewards (or a pairwise judge) on
the decoded images -> pairs -> the offline trainer's step on the sampled latents (no VAE round trip): one noise and
timestep per pair shared by winner, loser, policy and reference, one policy and one reference forward.

Every prompt has a fixed number of pair slots (1 for best_vs_worst), so every process forwards the same shapes and
draws its noise in lockstep; a slot whose images tie (or miss the gap) is forwarded but left out of the loss. Each
process's loss is weighted by its share of the global pairs, so the gradient is the mean over all pairs whatever the
process count, and a step without any pair on any process changes nothing.
"""

import inspect
import json
import math
import os
import time

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from . import losses
from .caching import derived_seed
from .feedback import candidate_pairs, is_preference
from .online_config import DiffusionOnlineDPOConfig
from .rewards import load_reward
from .sampling import iter_sample_batches
from .trainer import DiffusionDPOTrainer

REFERENCE_ADAPTER = "ref"
REFERENCE_WEIGHTS = "reference.safetensors"


def prepare_prompt_dataset(dataset, name: str = "train_dataset") -> datasets.Dataset:
    """A prompt dataset: a `prompt` column of non-empty strings; every other column goes to the reward functions."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`{name}` must be a datasets.Dataset of prompts, got {type(dataset).__name__}.")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"`{name}` has no 'prompt' column (found {dataset.column_names}); online DPO samples its "
                         "images from the prompts.")
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: there are no prompts to sample.")
    for row, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"Row {row}, column 'prompt': expected a non-empty string, got {prompt!r}.")
    return dataset


class PromptCollator:
    """Rows of a prompt dataset as lists per column (the prompts, and the columns the rewards receive).

    It has no image columns; `prompt_embeddings` (set by `precompute_text_embeddings`) is looked up for the generated
    pairs' prompts, by the trainer.
    """

    image_columns = ()
    prompt_embeddings = None

    def __call__(self, rows: list[dict]) -> dict[str, list]:
        return {key: [row[key] for row in rows] for key in rows[0]}


class RepeatedWindowSampler(torch.utils.data.Sampler):
    """A permutation of the prompts per epoch, cut into windows of one optimizer step's prompts over all processes
    and micro-steps, each window repeated `repeats` times in a row (the optimizer steps that reuse its samples).

    The last window is filled from the start of the permutation, so every window is complete. `set_epoch` (called by
    the Trainer) reshuffles, from the seed and the epoch only, so a resumed run sees the same order.
    """

    def __init__(self, size: int, window: int, repeats: int, seed: int):
        self.size, self.window, self.repeats, self.seed, self.epoch = size, window, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.window) * self.window * self.repeats

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        windows = math.ceil(self.size / self.window)
        order = (order * math.ceil(windows * self.window / self.size))[: windows * self.window]
        for start in range(0, len(order), self.window):
            for _ in range(self.repeats):
                yield from order[start : start + self.window]


class _SyncReference(TrainerCallback):
    """TRL's `SyncRefModelCallback` timing: after the optimizer step, before the step's checkpoint is written."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            self.trainer.sync_reference()


def _callable_name(fn) -> str:
    if isinstance(fn, str):
        return fn
    return getattr(fn, "__name__", type(fn).__name__)


def _takes_trl_keywords(fn) -> bool:
    """TRL's convention (`prompts=`, `completions=`, dataset columns as keywords) or ours (`fn(images, prompts)`)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in parameters}
    return "completions" in names or all(p.kind is p.VAR_KEYWORD for p in parameters)


class DiffusionOnlineDPOTrainer(DiffusionDPOTrainer):
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

    def __init__(
        self,
        model,
        ref_model=None,
        reward_funcs=None,
        judge=None,
        args: DiffusionOnlineDPOConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
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
        reward_funcs = [] if reward_funcs is None else reward_funcs
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.reward_func_names = _unique([_callable_name(fn) for fn in reward_funcs])
        self.reward_funcs = [load_reward(fn) for fn in reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} entries for {len(self.reward_funcs)} "
                             "reward functions; give one weight per function.")
        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float64)
        self.judge = judge
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=PromptCollator(),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config)
        if not self.paired:
            raise ValueError(f"loss_type {args.loss_type!r} needs labelled images; online DPO trains on pairs.")
        if args.sync_ref_model:
            if not losses.needs_reference(self.loss_types):
                raise ValueError(f"sync_ref_model: loss_type {args.loss_type!r} uses no reference model.")
            if self.is_lora:
                if ref_model is not None:
                    raise ValueError("sync_ref_model with LoRA keeps the reference as a second adapter of the policy's "
                                     "denoiser: do not pass `ref_model`.")
                self._add_reference_adapter()
            self.add_callback(_SyncReference(self))
        # The cached embeddings serve the training step; the pipeline still encodes prompts when it samples.
        for encoder in self.family.text_encoders:
            encoder.to(self.accelerator.device)
        self._buffer: dict[int, dict] = {}  # micro-step -> the generated batch it trains on until the next generation
        self._window = (None, -1)  # (optimizer step, micro-step within it) of the last training step
        self._eval_batches = 0

    # ----- construction -------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, name):
        return prepare_prompt_dataset(dataset, name)

    def _add_reference_adapter(self) -> None:
        """A second LoRA adapter, equal to the policy's initial one, that the family's reference switches to."""
        denoiser = self.family.denoiser
        config = denoiser.peft_config["default"]
        denoiser.add_adapter(config, adapter_name=REFERENCE_ADAPTER)
        denoiser.set_adapter("default")  # trainable again; the reference adapter is frozen
        for name, parameter in denoiser.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                parameter.requires_grad_(False)
        self.family.reference_adapter = REFERENCE_ADAPTER
        self.sync_reference(alpha=1.0)

    def _reference_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(reference parameter, policy parameter) for every parameter the reference sync moves."""
        if self.is_lora:
            named = dict(self.accelerator.unwrap_model(self.model).named_parameters())
            return [(named[name.replace(".default.", f".{REFERENCE_ADAPTER}.")], p)
                    for name, p in named.items() if ".default." in name]
        return list(zip(self.ref_model.parameters(), self.accelerator.unwrap_model(self.model).parameters(),
                        strict=True))

    @torch.no_grad()
    def sync_reference(self, alpha: float | None = None) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (alpha: `ref_model_mixup_alpha`)."""
        alpha = self.args.ref_model_mixup_alpha if alpha is None else alpha
        for reference, policy in self._reference_pairs():
            reference.lerp_(policy.to(reference.dtype), alpha)

    # ----- data ---------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        window = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        return RepeatedWindowSampler(len(self.train_dataset), window, args.num_iterations, args.seed)

    # ----- sampling, scoring, pairing -----------------------------------------------------------------------------
    def _sample(self, prompts: list[str], seeds: list[int]) -> tuple[list, torch.Tensor]:
        args = self.args
        images, latents = [], []
        batches = iter_sample_batches(
            self.pipeline, prompts, seeds, args.generation_batch_size or len(prompts), progress=False,
            return_latents=True, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            height=self.resolution, width=self.resolution,
        )
        with self.accelerator.autocast():
            for batch_images, batch_latents in batches:
                images += batch_images
                latents.append(self.family.sampled_latents(batch_latents, self.resolution).float())
        return images, torch.cat(latents)

    def _score(self, images, prompts: list[str], columns: dict[str, list]) -> torch.Tensor:
        """(images, reward functions) float64 scores, NaN where a function returned None."""
        scores = torch.full((len(images), len(self.reward_funcs)), math.nan, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            for k, (fn, name) in enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)):
                if _takes_trl_keywords(fn):
                    values = fn(prompts=prompts, completions=images, trainer_state=self.state, **columns)
                else:
                    values = fn(images, prompts)
                scores[:, k] = torch.tensor(self._check_rewards(values, len(images), name, prompts),
                                            dtype=torch.float64)
        return scores

    def _check_rewards(self, values, count: int, name: str, prompts: list[str]) -> list[float]:
        values = list(values)
        if len(values) != count:
            raise ValueError(f"Reward function {name!r} returned {len(values)} values for {count} images; expected "
                             "one per image (None for an image it does not score).")
        checked = []
        for i, value in enumerate(values):
            if value is None:
                checked.append(math.nan)
                continue
            if isinstance(value, torch.Tensor | np.ndarray) and np.ndim(value) == 0:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise TypeError(f"Reward function {name!r} returned {value!r} ({type(value).__name__}) for image {i} "
                                f"(prompt {prompts[i]!r}); expected a number, or None to skip the image.")
            if not math.isfinite(value):
                raise ValueError(f"Reward function {name!r} returned {value} for image {i} (prompt {prompts[i]!r}); "
                                 "expected a finite number (return None to leave an image unscored).")
            checked.append(float(value))
        return checked

    def combine_rewards(self, scores: torch.Tensor) -> torch.Tensor:
        """sum_k w_k * r_k over the functions that scored an image; NaN where none did (never paired)."""
        weighted = scores * self.reward_weights
        total = weighted.nansum(dim=1)
        return torch.where(scores.isnan().all(dim=1), math.nan, total)

    def _pair_slots(self, prompts: list[str], images, totals) -> list[tuple[int, int, int, bool]]:
        """(prompt, winner, loser, is a pair) per slot; a fixed number of slots per prompt."""
        n = self.args.num_images_per_prompt
        if self.judge is not None:
            starts = [(g, j) for g in range(len(prompts)) for j in range(0, n, 2)]
            verdicts = self.judge.judge([prompts[g] for g, _ in starts],
                                        [[images[g * n + j], images[g * n + j + 1]] for g, j in starts])
            if len(verdicts) != len(starts):
                raise ValueError(f"The judge returned {len(verdicts)} verdicts for {len(starts)} pairs.")
            slots = []
            for (g, j), verdict in zip(starts, verdicts, strict=True):
                if verdict not in (0, 1, -1):
                    raise ValueError(f"The judge returned {verdict!r} for prompt {prompts[g]!r}; expected 0 or 1 (the "
                                     "better image) or -1 (no decision).")
                winner = j + 1 if verdict == 1 else j
                slots.append((g, winner, 2 * j + 1 - winner, verdict != -1))
            return slots
        slots = []
        for g in range(len(prompts)):
            group = totals[g * n : (g + 1) * n].tolist()
            for winner, loser in candidate_pairs(group, self.args.pair_strategy):
                slots.append((g, winner, loser, is_preference(group[winner], group[loser], self.args.min_score_gap)))
        return slots

    def _generate(self, inputs: dict[str, list], key: tuple[int, ...], mode: str) -> dict:
        """Sample, score and pair the batch's prompts; the batch the offline step trains on."""
        args, n = self.args, self.args.num_images_per_prompt
        prompts = inputs["prompt"]
        first = self.accelerator.process_index * len(prompts)  # this process's place in the global batch
        flat_prompts = [p for p in prompts for _ in range(n)]
        seeds = [derived_seed(args.seed, *key, first + g, j) for g in range(len(prompts)) for j in range(n)]
        start = time.perf_counter()
        images, latents = self._sample(flat_prompts, seeds)
        columns = {k: [v for v in values for _ in range(n)] for k, values in inputs.items() if k != "prompt"}
        scores = self._score(images, flat_prompts, columns) if self.reward_funcs else None
        totals = self.combine_rewards(scores) if scores is not None else None
        slots = self._pair_slots(prompts, images, totals)
        valid = torch.tensor([slot[3] for slot in slots])
        chosen = [g * n + w for g, w, _, _ in slots]
        rejected = [g * n + loser for g, _, loser, _ in slots]
        size = torch.tensor([self.resolution, self.resolution])
        batch = {
            "prompt": [prompts[g] for g, _, _, _ in slots],
            "chosen_latents": latents[chosen],
            "rejected_latents": latents[rejected],
            "valid": valid,
            # SDXL's micro-conditioning of a generated image: its own size, no crop.
            "chosen_original_size": size.repeat(len(slots), 1),
            "rejected_original_size": size.repeat(len(slots), 1),
            "chosen_crop_top_left": torch.zeros(len(slots), 2, dtype=torch.long),
            "rejected_crop_top_left": torch.zeros(len(slots), 2, dtype=torch.long),
        }
        # Global statistics (every process computes the same), so they average like the trainer's other metrics.
        gather = self.accelerator.gather
        all_valid = gather(valid.double().to(self.accelerator.device)).cpu() > 0
        batch["num_pairs"] = int(all_valid.sum())
        store = self._metrics[mode]
        store["objective/no_pair_fraction"].append(
            torch.tensor(1.0 - all_valid.view(-1, len(slots) // len(prompts)).any(dim=1).double().mean().item()))
        if scores is not None:
            all_scores = gather(scores.to(self.accelerator.device)).cpu()
            all_totals = self.combine_rewards(all_scores)
            _store_spread(store, "objective/scores", all_totals)
            for k, name in enumerate(self.reward_func_names):
                _store_spread(store, f"objective/scores/{name}", all_scores[:, k])
            margins = torch.where(valid, totals[chosen] - totals[rejected], math.nan)
            all_margins = gather(margins.to(self.accelerator.device)).cpu()
            if (~all_margins.isnan()).any():
                store["objective/scores_margin"].append(all_margins.nanmean())
        store["time/generation"].append(torch.tensor(time.perf_counter() - start))
        return batch

    def _attach_embeddings(self, batch: dict) -> dict:
        cache = self.data_collator.prompt_embeddings
        return {**batch, "prompt_embeds": cache(batch["prompt"])} if cache is not None else batch

    # ----- the step -----------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()  # as Trainer.training_step does, also for a step that has no pair to train on
        step = self.state.global_step
        micro = self._window[1] + 1 if self._window[0] == step else 0
        self._window = (step, micro)
        if step % self.args.num_iterations == 0 or micro not in self._buffer:
            self._buffer[micro] = self._generate(inputs, (0, step, micro), "train")
        else:
            self._metrics["train"]["time/generation"].append(torch.tensor(0.0))
        batch = self._buffer[micro]
        if [p for p in inputs["prompt"]] != batch["prompt"][:: len(batch["prompt"]) // len(inputs["prompt"])]:
            raise RuntimeError("Internal error: the reused samples belong to other prompts than this step's.")
        start = time.perf_counter()
        if batch["num_pairs"] == 0:  # no pair on any process: no forward, no backward, no update
            loss = torch.zeros((), device=self.args.device)
        else:
            loss = super().training_step(model, self._attach_embeddings(batch), num_items_in_batch)
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
        if return_outputs:
            return output[0] * scale, output[1]
        return output * scale

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Sample and score the eval prompts with the current policy (fixed seeds per evaluation batch), and the
        DPO loss on their pairs."""
        batch = self._generate(inputs, (1, self._eval_batches), "eval")
        self._eval_batches += 1
        if batch["num_pairs"] == 0:
            return torch.tensor(math.nan, device=self.args.device), None, None
        return super().prediction_step(model, self._attach_embeddings(batch), prediction_loss_only, ignore_keys)

    def evaluation_loop(self, *args, **kwargs):
        self._eval_batches = 0
        return super().evaluation_loop(*args, **kwargs)

    # ----- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """Also the samples still to be reused (per process) and a synced reference: a resumed run continues with the
        same batches and the same reference as an uninterrupted one."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        rank = self.accelerator.process_index
        tensors, meta = {}, {}
        reused = self.args.num_iterations > 1 and self.state.global_step % self.args.num_iterations
        for micro, batch in self._buffer.items() if reused else ():
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{micro}/{key}"] = value.contiguous()
                else:
                    meta[f"{micro}/{key}"] = value
        if tensors:
            save_file(tensors, os.path.join(folder, f"online_buffer_{rank}.safetensors"))
            with open(os.path.join(folder, f"online_buffer_{rank}.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
        if self.args.sync_ref_model and self.args.should_save:
            save_file({str(i): ref.detach().contiguous() for i, (ref, _) in enumerate(self._reference_pairs())},
                      os.path.join(folder, REFERENCE_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        rank = self.accelerator.process_index
        path = os.path.join(resume_from_checkpoint, f"online_buffer_{rank}.safetensors")
        if os.path.isfile(path):
            tensors = load_file(path)
            with open(os.path.join(resume_from_checkpoint, f"online_buffer_{rank}.json"), encoding="utf-8") as f:
                meta = json.load(f)
            buffer: dict[int, dict] = {}
            for name, value in [*tensors.items(), *meta.items()]:
                micro, key = name.split("/", 1)
                buffer.setdefault(int(micro), {})[key] = value
            self._buffer = buffer
        if self.args.sync_ref_model:
            path = os.path.join(resume_from_checkpoint, REFERENCE_WEIGHTS)
            if not os.path.isfile(path):
                raise ValueError(f"Cannot resume: {path} does not exist (a sync_ref_model run saves its reference).")
            saved = load_file(path)
            with torch.no_grad():
                for i, (reference, _) in enumerate(self._reference_pairs()):
                    reference.copy_(saved[str(i)])


def _store_spread(store, name: str, values: torch.Tensor) -> None:
    """Mean and standard deviation of the scored (non-NaN) values."""
    values = values[~values.isnan()]
    if values.numel():
        store[name].append(values.mean())
        store[f"{name.replace('objective/scores', 'objective/scores_std', 1)}"].append(
            values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(()))


def _unique(names: list[str]) -> list[str]:
    """Reward names as metric keys: a repeated name gets its position appended."""
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
