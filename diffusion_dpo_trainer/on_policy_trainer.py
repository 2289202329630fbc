"""`OnPolicyTrainer`: what every trainer on the policy's own samples shares (online DPO, GRPO, DiffusionNFT).

Each of them takes reward functions with weights, reads a prompt dataset in windows that repeat for the steps that
reuse a rollout, keeps those rollouts in a `RolloutBuffer`, and may keep a synced reference; their checkpoints hold
that state, written BEFORE the Trainer's own files (its `trainer_state.json` marks a checkpoint complete, and only then
are older checkpoints rotated away). A method adds its ending (pairs, advantages, a forward-process loss) on top.

Each rollout's prompts are encoded once (`_conditioning`, one row per prompt): the rollout samples with those tensors
and its batch keeps them (`keep_conditioning`), so the training forwards, and the optimizer steps that reuse the
rollout, read them back (`_kept_conditioning`) instead of running the text encoders again.
"""

import os

import torch

from .collators import prepare_prompt_dataset
from .reuse import RepeatedWindowSampler, saved_step
from .rewards import load_reward
from .rewards.scoring import reward_name, unique_names
from .rollout import guidance_conditioning
from .trainer import DiffusionDPOTrainer

#: A batch's keys of the rollout's conditioning and of guidance's negative: prefix + the family's conditioning key.
CONDITIONING = ("conditioning/", "negative/")


def keep_conditioning(conditioning: dict, negative: dict | None = None) -> dict[str, torch.Tensor]:
    """The rollout's conditioning (and guidance's negative, for a method that guides in training) as a batch's flat
    keys, one row per prompt: flat, so the reuse buffer saves them with a checkpoint."""
    return {f"{prefix}{name}": value for prefix, entry in zip(CONDITIONING, (conditioning, negative))
            for name, value in (entry or {}).items()}


class OnPolicyTrainer(DiffusionDPOTrainer):
    synced_reference = None  # a `SyncedReference` when the method keeps one (`sync_ref_model`)

    def _set_up_rewards(self, reward_funcs, args) -> None:
        """`reward_funcs` (one, a list, or None) as loaded reward callables with unique names and their weights."""
        reward_funcs = [] if reward_funcs is None else reward_funcs
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if any(fn is None for fn in reward_funcs):
            raise ValueError("`reward_funcs` holds None: each reward is a callable or a `load_reward` name.")
        self.reward_func_names = unique_names([reward_name(fn) for fn in reward_funcs])
        self.reward_funcs = [load_reward(fn) for fn in reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} entries for {len(self.reward_funcs)} "
                             "reward functions; give one weight per function.")
        self.reward_weights = args.reward_weights or [1.0] * len(self.reward_funcs)

    # ----- conditioning -------------------------------------------------------------------------------------------
    def _precompute_caches(self) -> None:
        if self.family.guidance(self.args.guidance_scale) == "cfg":
            self.data_collator.extra_prompts = ("",)  # most pipelines' negative: cached with the prompts
        super()._precompute_caches()

    def _prompt_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The prompts' conditioning as training sees it: the text cache's when there is one, else
        `family.encode_prompt` (`max_prompt_length` applies). Rollouts sample with it (`rollout(encode=...)`), so the
        images and the training forward are conditioned on the same tensors."""
        cache, inputs = self.data_collator.prompt_embeddings, {"prompt": prompts}
        if cache is not None:
            inputs["prompt_embeds"] = cache(prompts)
        with torch.no_grad():
            return self._prompt_embeddings(inputs)

    def _conditioning(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The prompts' conditioning and, with classifier-free guidance, the pipeline's own unconditional one (else
        None), one row per prompt (text cache or encoder, the family's negative): encoded once per rollout, as the
        rollout would (autocast), and passed to it as `rollout(conditioning=...)`."""
        with self.accelerator.autocast():
            conditioning = self._prompt_conditioning(prompts)
            return conditioning, guidance_conditioning(self.family, conditioning, self._prompt_conditioning,
                                                       self.args.guidance_scale)

    def _kept_conditioning(self, batch: dict) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """The conditioning and negative `keep_conditioning` put in `batch` (None where it kept none), one row per
        image on the device: each prompt's row repeated for its `len(batch["prompt"]) // rows` consecutive images
        (a group, or a prompt's pair slots)."""
        device, entries = self.accelerator.device, []
        for prefix in CONDITIONING:
            kept = {name[len(prefix):]: value for name, value in batch.items() if name.startswith(prefix)}
            repeats = len(batch["prompt"]) // len(next(iter(kept.values()))) if kept else 0
            entries.append({name: value.to(device).repeat_interleave(repeats, dim=0) for name, value in kept.items()}
                           or None)
        return tuple(entries)

    def _training_conditioning(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """`_kept_conditioning` with the family's per-image conditioning (SDXL's time ids, for both guidance branches,
        as its pipeline repeats them): built once per micro-step, for every forward of it."""
        extra = self.family.time_conditioning(batch, self.resolution, self.accelerator.device)
        return tuple({**entry, **extra} if entry else None for entry in self._kept_conditioning(batch))

    def _prompt_embeddings(self, inputs) -> dict[str, torch.Tensor]:
        """A batch that keeps its rollout's conditioning is conditioned on it (online DPO's offline step); any other
        input is encoded (or read from the text cache) as offline."""
        kept, _ = self._kept_conditioning(inputs)
        return super()._prompt_embeddings(inputs) if kept is None else kept

    # ----- data ---------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, name):
        return prepare_prompt_dataset(dataset, name)

    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        window = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        return RepeatedWindowSampler(len(self.train_dataset), window, args.num_iterations, args.seed)

    def evaluation_loop(self, *args, **kwargs):
        self._eval_batches = 0  # evaluation seeds count from the first evaluation batch, every evaluation
        return super().evaluation_loop(*args, **kwargs)

    # ----- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        self._buffer.save(folder, self.accelerator.process_index, self.state.global_step)
        if self.synced_reference is not None and self.args.should_save:
            self.synced_reference.save(folder)
        self._save_method_state(folder)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._buffer.load(resume_from_checkpoint, self.accelerator.process_index, saved_step(resume_from_checkpoint))
        if self.synced_reference is not None:
            self.synced_reference.load(resume_from_checkpoint)
        self._load_method_state(resume_from_checkpoint)

    def _save_method_state(self, folder: str) -> None:
        """A method's own checkpoint state (DiffusionNFT: its old policy), written before the Trainer's files."""

    def _load_method_state(self, folder: str) -> None:
        """Read back what `_save_method_state` wrote, refusing a checkpoint that lacks it by name."""
