"""`DiffusionDPOTrainer`: a `transformers.Trainer` whose model is the denoiser of a diffusers pipeline.

The trainer knows nothing model-specific (that is the family's job) and no loss math (that is `losses.py`'s): it
draws one noise and one timestep per pair, runs ONE policy forward on winners and losers together and ONE reference
forward on exactly the same inputs, and hands the per-sample errors to the loss. Unpaired losses (KTO) get one noise
and timestep per image instead, and no loss that needs no reference ever runs one.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import warnings
import zipfile
from collections import defaultdict
from contextlib import contextmanager

import datasets
import torch
from accelerate.utils import get_module_children_bottom_up
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.trainer_utils import enable_full_determinism, set_seed
from trl.models import prepare_deepspeed, prepare_fsdp

from . import losses
from .caching import precompute_for_training
from .collators import PreferenceCollator, UnpairedCollator
from .config import DiffusionDPOConfig
from .curriculum import CurriculumSampler
from .families import load_family
from .formats import (
    LABEL_COLUMN,
    ROW_COLUMN,
    check_one_step_fits,
    map_eval_datasets,
    prepare_preference_dataset,
    prepare_unpaired_dataset,
)
from .model_card import card_hyperparameters, render_model_card
from .quantization import is_quantized
from .reference_cache import DrawEpochCallback, RowDraws, precompute_reference_errors, reference_fingerprint
from .video_data import VideoPreferenceCollator, VideoUnpairedCollator, check_num_frames

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: What a failed write raises: OSError from Python's files, SafetensorError from safetensors (a full disk is
#: "I/O error: No space left on device") and RuntimeError from torch.save's zip writer ("unexpected pos ...").
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)
# The per-sample errors that make up the loss, named in the non-finite-loss error.
NONFINITE_TERMS = ("mse/chosen", "mse/rejected", "ref_mse/chosen", "ref_mse/rejected")


class _DiffusersTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback writes `model.config.to_json_string()`, which diffusers configs lack."""

    def on_train_begin(self, args, state, control, **kwargs):
        kwargs.pop("model", None)
        super().on_train_begin(args, state, control, **kwargs)


class DiffusionDPOTrainer(Trainer):
    """Preference fine-tuning of a text-to-image diffusion model, with the signature of TRL's `DPOTrainer`.

    Args:
        model: a hub id, a local path or a `DiffusionPipeline`. Its denoiser is what gets trained.
        ref_model: the reference. `None` means: the adapter-disabled denoiser when training LoRA (no second copy in
            memory), a frozen copy of the initial denoiser for a full fine-tune. A pipeline, a denoiser module or an
            id/path is used as given.
        peft_config: a `peft.LoraConfig` to train a LoRA adapter on the denoiser instead of all its weights. Without
            `target_modules`, the family's `lora_target_modules` (the attention projections) are used.
        train_dataset, eval_dataset: for paired losses, preference pairs in any format `to_preference_pairs` reads
            (TRL-style prompt/chosen/rejected, Pick-a-Pic, or a path to an image folder), stored normalised as in
            TRL; a streamed `datasets.IterableDataset` of the first two is normalised as it streams (set `max_steps`);
            for `loss_type="kto"`, labelled images (`prompt`, `image`, `label` True when desirable). For a video model
            (Wan) the same columns hold videos (files, bytes, `datasets.Video` or frames; kto rows use `video`), cut
            to `num_frames`-frame clips with one window, crop and flip per pair: see docs/video.md.
        Other arguments are those of `transformers.Trainer`.
    """

    _tag_names = ["diffusion-dpo", "diffusers"]
    #: The easy-to-hard sampler of `curriculum_stages` > 1, once the train dataloader exists.
    curriculum: CurriculumSampler | None = None

    def __init__(
        self,
        model,
        ref_model=None,
        args: DiffusionDPOConfig | None = None,
        data_collator=None,
        train_dataset: datasets.Dataset | datasets.IterableDataset | str | None = None,
        eval_dataset: datasets.Dataset | str | dict[str, datasets.Dataset | str] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if args is None:
            args = DiffusionDPOConfig(output_dir="diffusion-dpo")
        self.args = args  # the precision properties read it before `Trainer.__init__` sets it (to the same object)
        # Seed before the adapter is initialised, so one seed gives one run (Trainer seeds only after this).
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        self._load_model(model)
        self._check_precompute_ref_errors()
        self._set_up_denoiser(peft_config)
        self._set_up_reference(ref_model)
        self._set_up_precision()
        data_collator, train_dataset, eval_dataset = self._set_up_data(data_collator, train_dataset, eval_dataset)

        super().__init__(
            model=self.family.denoiser,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )

        callbacks = self.callback_handler.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is TensorBoardCallback:
                callbacks[i] = _DiffusersTensorBoardCallback(callback.tb_writer)
        self._place_frozen_modules()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._precompute_caches()

    # ----- set-up, one idea per method (a subclass overrides the one it changes) -------------------------------------
    def _load_model(self, model) -> None:
        """The family (pipeline, denoiser, frozen modules), the resolved beta and the selected losses."""
        args = self.args
        with _loaded_whole(args):
            self.family = load_family(model, args)
        # Resolved once; everything reads `self.beta`, never `args.beta` (None means the family's default).
        self.beta = float(args.beta) if args.beta is not None else float(self.family.default_beta)
        self.base_model_id = model if isinstance(model, (str, os.PathLike)) else self.family.pipeline.name_or_path
        self.loss_types, self.paired, self.loss_params = self._resolve_loss(args)
        self._check_stabilisers()

    def _check_precompute_ref_errors(self) -> None:
        """What `precompute_ref_errors` needs, checked before anything is encoded or moved."""
        args = self.args
        if not args.precompute_ref_errors:
            return
        if not args.precompute_latents:
            raise ValueError("precompute_ref_errors=True needs precompute_latents=True: the reference errors are "
                             "computed for each pair's stored latents (and crop).")
        if not losses.needs_reference(self.loss_types):
            raise ValueError(f"precompute_ref_errors=True, but loss_type {args.loss_type!r} uses no reference model.")
        if args.dataloader_persistent_workers:
            raise ValueError("precompute_ref_errors=True cannot use dataloader_persistent_workers: the workers would "
                             "keep drawing with the epoch they started in.")

    def _set_up_denoiser(self, peft_config) -> None:
        """Freeze everything but the denoiser, and train either all of its weights or a LoRA adapter on it."""
        denoiser = self.family.denoiser
        for module in self.family.frozen_modules:
            module.requires_grad_(False)
            module.eval()
        if is_quantized(denoiser) and peft_config is None:
            raise ValueError(
                f"The {self.family.denoiser_name} was loaded quantized (model_init_kwargs['quantization_config']), so "
                "it cannot be fully fine-tuned: its 4/8-bit weights take no gradient updates. Pass a peft_config to "
                "train a LoRA adapter on the quantized base (QLoRA), or load it without quantization_config."
            )
        if peft_config is not None:
            if hasattr(peft_config, "target_modules") and peft_config.target_modules is None:
                # The family's documented default targets (attention projections).
                peft_config = dataclasses.replace(peft_config, target_modules=list(self.family.lora_target_modules))
            denoiser.requires_grad_(False)
            denoiser.add_adapter(peft_config)
        self.is_lora = bool(getattr(denoiser, "peft_config", None))

    def _set_up_reference(self, ref_model) -> None:
        """Hand the family its reference: the one given, a frozen copy for a full fine-tune, or (LoRA) none, the
        adapter-disabled policy serving (see `family.reference()`)."""
        args = self.args
        if losses.needs_reference(self.loss_types):
            if ref_model is not None:
                self.family.set_reference(ref_model, args.ref_model_init_kwargs)
            elif not self.is_lora and not args.precompute_ref_errors:  # precomputed: the initial denoiser serves
                self.family.freeze_reference_copy()
        elif ref_model is not None:
            warnings.warn(f"`ref_model` is ignored: loss_type {args.loss_type!r} needs no reference model.")

    def _set_up_precision(self) -> None:
        """The denoiser's dtypes and activation checkpointing: what a step's numerics and memory depend on."""
        denoiser = self.family.denoiser
        if self.is_lora and self.weight_dtype != torch.float32:
            # Frozen base weights in half precision; the adapter stays in float32 for stable updates. A quantized base
            # keeps the dtypes it was loaded with (`torch_dtype` for its unquantized layers): it cannot be cast. A
            # denoiser loaded in that dtype is left as loaded: diffusers keeps some modules in float32 (Wan's norms,
            # rope, time embedding).
            if not is_quantized(denoiser) and denoiser.dtype != self.weight_dtype:
                denoiser.to(dtype=self.weight_dtype)
            cast_training_params(denoiser, dtype=torch.float32)
        if self.args.activation_checkpointing:
            # Diffusers models have their own switch; the Trainer only knows the transformers one, so give it that.
            denoiser.enable_gradient_checkpointing()
            denoiser.activation_checkpointing_enable = lambda **_: None

    def _set_up_data(self, data_collator, train_dataset, eval_dataset):
        """The training resolution (and clip length), the default collator, and the datasets checked and normalised:
        the `(data_collator, train_dataset, eval_dataset)` for `Trainer.__init__`."""
        args = self.args
        self.resolution = args.resolution or self.family.native_resolution()
        self.family.check_resolution(self.resolution)
        #: Frames per training clip of a video model (None for image models).
        self.num_frames = None
        if self.family.temporal_compression is not None:
            self.num_frames = self.family.default_num_frames if args.num_frames is None else args.num_frames
            check_num_frames(self.num_frames, self.family.temporal_compression)
            collator_class = VideoPreferenceCollator if self.paired else VideoUnpairedCollator
            make_collator = functools.partial(collator_class, self.resolution, self.num_frames, args.frame_stride,
                                              args.video_fps, args.random_crop, args.random_flip)
        else:
            collator_class = PreferenceCollator if self.paired else UnpairedCollator
            make_collator = functools.partial(collator_class, self.resolution, args.random_crop, args.random_flip)
        if data_collator is None:
            data_collator = make_collator(proportion_empty_prompts=args.proportion_empty_prompts, seed=args.seed)
        elif args.proportion_empty_prompts and not isinstance(data_collator, PreferenceCollator):
            warnings.warn("proportion_empty_prompts is applied by the default collator; the data_collator passed in "
                          "decides the prompts itself, so no prompt is dropped unless it does so.")
        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, "train_dataset")
        return data_collator, train_dataset, map_eval_datasets(eval_dataset, self._prepare_dataset)

    def _place_frozen_modules(self) -> None:
        """The frozen modules on the training device in their dtypes; encoders whose outputs get cached wait on the
        CPU (the caching runs them while the denoiser steps aside). A frozen reference copy is sharded like the
        policy."""
        args, device = self.args, self.accelerator.device
        # A half-precision VAE overflows in fp16 (the known SDXL VAE NaNs); bf16 is safe.
        vae_dtype = torch.bfloat16 if args.bf16 else torch.float32
        _move(self.family.vae, "cpu" if args.precompute_latents else device, vae_dtype)
        for encoder in self.family.text_encoders:
            _move(encoder, "cpu" if args.precompute_text_embeddings else device, self.weight_dtype)
        if self.ref_model is not None:
            _move(self.ref_model, device, self.weight_dtype)
            if not args.precompute_ref_errors:  # precomputed: it runs in each process's own pass, then it is dropped
                self.family.set_reference(self._shard_reference(self.ref_model))

    def _precompute_caches(self) -> None:
        """The latent, prompt-embedding and reference-error caches the options ask for (docs/datasets.md)."""
        args = self.args
        if args.precompute_latents or args.precompute_text_embeddings:
            self.train_dataset, self.eval_dataset = precompute_for_training(
                self.family, self.train_dataset, self.eval_dataset, self.data_collator, args, self.accelerator.device
            )
        if args.precompute_ref_errors:
            with args.main_process_first(desc="precomputing the reference's errors"):
                self._precompute_reference_errors()

    def _resolve_loss(self, args):
        """The selected Diffusion-DPO losses as (name, weight) pairs, whether they are paired, and their parameters.
        A trainer with a loss of its own (GRPO) returns no DPO loss: then no reference is set up for one."""
        loss_types = losses.resolve_loss_types(args.loss_type, args.loss_weights)
        return loss_types, losses.is_paired(loss_types), losses.LossParams.from_config(args, beta=self.beta)

    @property
    def pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline being trained (its denoiser is `self.model`), e.g. to sample from the policy."""
        return self.family.pipeline

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The explicit or frozen reference denoiser; None when the reference is the adapter-disabled policy (or
        no selected loss needs one). Owned by the family: `self.family.reference()` is the one switch."""
        return self.family.ref_model

    def _prepare_dataset(self, dataset, name: str):
        """Validate a train/eval dataset and normalise its rows for the collator (pairs, or labelled images)."""
        if self.paired:
            # the loss reads soft labels in training and evaluation; the curriculum orders the training pairs only
            labels = self.args.soft_labels != "none" or (self.args.curriculum_stages > 1 and name == "train_dataset")
            return prepare_preference_dataset(dataset, name, soft_labels=labels, keep_ties=self.args.keep_ties)
        return prepare_unpaired_dataset(dataset, name, column="image" if self.num_frames is None else "video")

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(self.args.fsdp)
        if asked and not self.is_fsdp_enabled:
            warnings.warn(
                f"The launch config asks for FSDP, but accelerate enables FSDP only on GPUs (this run: "
                f"{self.accelerator.distributed_type.value}): it trains WITHOUT FSDP, every process holding the whole "
                "model, its gradients and optimizer state. Launch on GPUs to shard; on CPU, tests lift the gate with "
                "diffusion_dpo_trainer.testing.allow_fsdp_on_cpu."
            )

    def get_train_dataloader(self):
        """The Trainer's loader, once one optimizer step is known to fit the data (a stream too short for one would
        loop forever) and with no more workers than a stream has shards (datasets stops the rest, warning each pass)."""
        args, dataset = self.args, self.train_dataset
        if dataset is not None:
            check_one_step_fits(dataset, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                args.world_size, args.dataloader_drop_last)
        workers = args.dataloader_num_workers
        if not isinstance(dataset, datasets.IterableDataset) or workers <= dataset.num_shards:
            return super().get_train_dataloader()
        warnings.warn(f"dataloader_num_workers={workers}, but the training stream has {dataset.num_shards} shard(s) "
                      f"(files): using {dataset.num_shards} worker(s).")
        args.dataloader_num_workers = dataset.num_shards
        try:
            return super().get_train_dataloader()
        finally:
            args.dataloader_num_workers = workers

    def _check_stabilisers(self) -> None:
        """The stabilisers act on pairs; soft labels enter through the DPO logit of `sigmoid`."""
        args, names = self.args, [name for name, _ in self.loss_types]
        on = [name for name in ("winner_preserving_mu", "soft_labels", "keep_ties", "timestep_min", "timestep_max",
                                "timestep_weight_power", "curriculum_stages")
              if getattr(args, name) != getattr(DiffusionDPOConfig, name)]
        if not self.paired and on:
            raise ValueError(f"{on} apply to paired data; loss_type {names} trains on unpaired images.")
        if args.soft_labels != "none" and not any(losses.LOSSES[name].soft_labels for name in names):
            raise ValueError(f"soft_labels={args.soft_labels!r} is read by `sigmoid` (the DPO logit), which loss_type "
                             f"{names} does not include.")

    def _get_train_sampler(self, train_dataset=None):
        """With `curriculum_stages` > 1, the easy-to-hard `CurriculumSampler` over the pairs' label margins."""
        if self.args.curriculum_stages == 1:
            return super()._get_train_sampler(train_dataset)
        args = self.args
        dataset = self.train_dataset if train_dataset is None else train_dataset
        labels = dataset.with_format(None)[LABEL_COLUMN]
        # With max_steps the whole run is one epoch of the sampler, so the stages span training.
        samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * \
            args.world_size if args.max_steps > 0 else None
        self.curriculum = CurriculumSampler([abs(2.0 * p - 1.0) for p in labels], args.curriculum_stages, args.seed,
                                            samples)
        return self.curriculum

    @property
    def mixed_precision(self) -> str:
        """'bf16', 'fp16' or 'no', as accelerate names it."""
        return "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "no"

    def _shard_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference sharded like the policy under FSDP and ZeRO-3 (TRL's `prepare_fsdp` and
        `prepare_deepspeed`), so a full fine-tune does not hold a whole copy per process. Under FSDP2 each block the
        wrap policy names is sharded first, so a reference forward gathers one block at a time, not all of them."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        if not self.is_fsdp_enabled:
            return reference
        plugin = self.accelerator.state.fsdp_plugin
        wrap = fsdp2_prepare_auto_wrap_policy(plugin, reference) if plugin.fsdp_version == 2 else None
        for module in get_module_children_bottom_up(reference)[:-1] if wrap is not None else []:
            if wrap(module):
                prepare_fsdp(module, self.accelerator)
        return prepare_fsdp(reference, self.accelerator)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of frozen weights (text encoders, a LoRA run's base, the reference) and cached embeddings."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[self.mixed_precision]

    # ----- precomputed reference errors (see reference_cache.py) -----------------------------------------------------
    def _precompute_reference_errors(self) -> None:
        """Run the reference once on every row's per-epoch draws and store its errors, then drop it: training reads
        the errors and never runs a reference."""
        args = self.args
        draws = RowDraws(args.seed, self.family.sample_timesteps, args.random_flip)
        self.data_collator.draws = draws
        self.add_callback(DrawEpochCallback(draws))
        images = len(self.data_collator.image_columns)

        def errors(inputs):  # (rows, images per row)
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.accelerator.autocast(), self._initial_reference() as reference:
                x0, noise, timesteps, conditioning = self._denoiser_inputs(inputs)
                noisy, target = self.family.noisy_latents_and_target(x0, noise, timesteps)
                return losses.per_sample_mse(self.family.predict(reference, noisy, timesteps, conditioning),
                                             target).view(images, -1).T

        with self._initial_reference() as reference:
            settings = [args.seed, args.random_flip, self.resolution, str(self.weight_dtype), self.mixed_precision,
                        args.proportion_empty_prompts]  # a dropped prompt is "" for the reference too
            fingerprint = reference_fingerprint(self.family, reference, settings)

        def cache(dataset, epochs):
            return precompute_reference_errors(dataset, self.data_collator, errors, epochs, fingerprint,
                                               args.per_device_train_batch_size)

        if self.train_dataset is not None:
            self.train_dataset = cache(self.train_dataset, self._num_train_epochs())
        # Evaluation uses epoch 0's draws: a fixed, comparable eval loss.
        self.eval_dataset = map_eval_datasets(self.eval_dataset, lambda dataset, name: cache(dataset, 1))
        self.family.set_reference(None)

    @contextmanager
    def _initial_reference(self):
        """The reference for the pass before training: the family's, or in a full fine-tune (whose frozen copy is
        never made) the denoiser itself, which still holds the initial weights."""
        if self.ref_model is None and not self.family.has_adapters:
            yield self.family.denoiser
            return
        with self.family.reference() as reference:
            yield reference

    def _num_train_epochs(self) -> int:
        """The number of epochs `train()` will run, computed as the Trainer does (it is only known inside train())."""
        args = self.args
        per_batch = args.per_device_train_batch_size * args.world_size
        rows = len(self.train_dataset)
        batches = rows // per_batch if args.dataloader_drop_last else math.ceil(rows / per_batch)
        updates = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        return math.ceil(args.max_steps / updates) if args.max_steps > 0 else math.ceil(args.num_train_epochs)

    # ----- the loss -----------------------------------------------------------------------------------------------
    def _own_share(self, global_draw: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This process's slice of a random draw made for the whole global batch (pairs along `dim`).

        Every process is seeded alike, so drawing only the local batch would give every process the SAME noise and
        timesteps. Drawing the global batch and keeping one's own slice gives each pair its own draw, and N processes
        reproduce a single-process run with the same global batch.
        """
        if self.accelerator.num_processes == 1:
            return global_draw
        return global_draw.chunk(self.accelerator.num_processes, dim)[self.accelerator.process_index]

    def _sample_latents(self, mean, std, groups: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * eps, with eps drawn for the global batch (`groups` blocks: winners, losers) in a fixed layout,
        so the draw depends neither on the process count nor on the memory layout of a cached or fresh encoding.
        `eps` of shape (rows, groups, ...) is the rows' own draw (precompute_ref_errors)."""
        if eps is not None:
            eps = eps.transpose(0, 1).reshape(mean.shape)
        else:
            per_group = mean.shape[0] // groups
            shape = (groups, per_group * self.accelerator.num_processes, *mean.shape[1:])
            eps = self._own_share(torch.randn(shape, device=mean.device, dtype=mean.dtype), dim=1).reshape(mean.shape)
        # Contiguous latents: a channels-last VAE output (CPU) would otherwise send the denoiser down other kernels.
        return self.family.scale_latents(mean.contiguous() + std.contiguous() * eps)

    def _prompt_embeddings(self, inputs) -> dict[str, torch.Tensor]:
        if "prompt_embeds" in inputs:  # precomputed, stored in float32: back to the text encoders' dtype
            return {key: value.to(self.weight_dtype) for key, value in inputs["prompt_embeds"].items()}
        with self._long_prompts.watch(self.family.pipeline, inputs["prompt"], inputs.get(ROW_COLUMN)):
            return self.family.encode_prompt(inputs["prompt"], self.accelerator.device)

    @functools.cached_property
    def _long_prompts(self) -> "_LongPromptNotice":
        return _LongPromptNotice()

    def _clean_latents(self, inputs, sides: tuple[str, ...]) -> torch.Tensor:
        """x0 of every image, winners first, from whichever form the canonical batch holds it in
        (docs/architecture.md): latents as generated (a rollout's: no VAE round trip), a cached VAE distribution
        (no VAE call), or pixels to encode."""
        if f"{sides[0]}latents" in inputs:
            return torch.cat([inputs[f"{side}latents"] for side in sides])
        if f"{sides[0]}latent_mean" in inputs:
            mean = torch.cat([inputs[f"{side}latent_mean"] for side in sides])
            std = torch.cat([inputs[f"{side}latent_std"] for side in sides])
        else:
            mean, std = self.family.encode_pixels(torch.cat([inputs[f"{side}pixel_values"] for side in sides]))
        return self._sample_latents(mean, std, len(sides), inputs.get("latent_eps"))

    def _denoiser_inputs(self, inputs):
        """x0, noise, timesteps and conditioning of a canonical batch, (groups * B) samples.

        Paired batches hold winners then losers (two groups) and draw ONE noise and ONE timestep per pair, shared by
        winner, loser, policy and reference; unpaired (KTO) images are independent: one group, a draw per image.
        A batch may carry each row's own draws instead (`precompute_ref_errors`).
        """
        sides = ("chosen_", "rejected_") if self.paired else ("",)  # the collators' batch-key prefixes
        groups = len(sides)
        x0 = self._clean_latents(inputs, sides)
        if "noise" in inputs:  # each row's own draws (precompute_ref_errors)
            noise, timesteps = inputs["noise"], inputs["timesteps"]
        else:
            per_group, world = x0.shape[0] // groups, self.accelerator.num_processes
            noise = self._own_share(torch.randn((world * per_group, *x0.shape[1:]), device=x0.device, dtype=x0.dtype))
            timesteps = self._own_share(self.family.sample_timesteps(world * per_group, x0.device))
        noise = noise.repeat(groups, *([1] * (x0.ndim - 1)))
        timesteps = timesteps.repeat(groups)
        conditioning = {key: torch.cat([value] * groups) for key, value in self._prompt_embeddings(inputs).items()}
        conditioning.update(self.family.time_conditioning(inputs, self.resolution, self.accelerator.device))
        return x0, noise, timesteps, conditioning

    def _denoising_errors(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample mse of policy and reference, shape (groups * B): ONE policy forward and, when a selected loss
        needs a reference, ONE reference forward on exactly the policy's inputs, or the batch's precomputed errors.

        The reference runs first, before the policy's graph holds its activations: its short-lived buffers never add
        to the graph's peak, and on CPU they reuse memory the allocator still holds instead of faulting in fresh
        pages (docs/performance.md)."""
        x0, noise, timesteps, conditioning = self._denoiser_inputs(inputs)
        noisy, target = self.family.noisy_latents_and_target(x0, noise, timesteps)
        ref_mse = None
        if "ref_mse" in inputs:  # (rows, groups) -> winners first
            ref_mse = inputs["ref_mse"].T.reshape(-1)
        elif self.args.precompute_ref_errors:
            raise RuntimeError("precompute_ref_errors=True, but this batch carries no precomputed reference errors.")
        elif losses.needs_reference(self.loss_types):
            with torch.no_grad(), self.family.reference() as reference:
                ref_mse = losses.per_sample_mse(self.family.predict(reference, noisy, timesteps, conditioning), target)
        prediction = self.family.predict(model, noisy, timesteps, conditioning)
        self._stabiliser_terms = self._stabilisers(prediction, target, timesteps)
        return losses.per_sample_mse(prediction, target), ref_mse

    def _stabilisers(self, prediction, target, timesteps) -> dict:
        """What the paired-loss stabilisers read besides the errors: `compute_paired_loss`'s keyword arguments."""
        params, terms = self.loss_params, {}
        if not self.paired:
            return terms
        if params.winner_preserving_mu is not None:  # this process's batch, as the reference code does per GPU
            error_w, error_l = (prediction.detach().float() - target.float()).chunk(2)
            terms["lose_scale"] = losses.winner_preserving_lambda(error_w, error_l, params.winner_preserving_mu)
        if losses.timesteps_active(params):
            terms["noise_level"] = timesteps.chunk(2)[0].float() / self.family.num_train_timesteps
        return terms

    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the batches of all processes (sum and count gathered, so uneven last batches are fine)."""
        stats = torch.stack([values.sum(), values.new_tensor(float(values.numel()))]).float()
        total = self.accelerator.gather(stats[None]).sum(dim=0)
        return total[0] / total[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():
            policy_mse, ref_mse = self._denoising_errors(model, inputs)
        if self.paired:
            loss, metrics = losses.compute_paired_loss(self.loss_types, policy_mse, ref_mse, self.loss_params,
                                                       label=inputs.get(LABEL_COLUMN), **self._stabiliser_terms)
            if model.training and self.curriculum is not None:  # the stage this step draws from
                position = (self.state.epoch or 0.0) % 1.0 * len(self.curriculum)
                metrics["curriculum/stage"] = policy_mse.new_tensor(float(self.curriculum.stage_at(int(position))))
        else:
            loss, metrics = losses.compute_unpaired_loss(
                self.loss_types, policy_mse, ref_mse, inputs["label"], self.loss_params, self._global_mean
            )
        store = self._metrics["train" if model.training else "eval"]
        for key, value in metrics.items():
            store[key].append(value)
        return (loss, metrics) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One host sync per micro-step, at the point where the Trainer's own `logging_nan_inf_filter` already syncs
        # on this loss; raising before the optimizer step keeps the weights (and every later checkpoint) finite.
        if not torch.isfinite(loss):
            self._raise_non_finite_loss(loss)
        return loss

    def _raise_non_finite_loss(self, loss: torch.Tensor) -> None:
        store = self._metrics["train"]
        terms = ", ".join(f"{name}={store[name][-1].item():.6g}" for name in NONFINITE_TERMS if store.get(name))
        precision = {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)
        raise FloatingPointError(
            f"Non-finite loss ({loss.item()}) at step {self.state.global_step + 1} ({precision}); loss terms of this "
            f"batch: {terms}. Non-finite reference errors point at the inputs (an fp16 VAE overflows: use bf16, or "
            "for SDXL the madebyollin/sdxl-vae-fp16-fix VAE); non-finite policy errors at the update (lower "
            "learning_rate or beta, set max_grad_norm, or train in bf16 instead of fp16). Training stopped before the "
            "optimizer step, so the weights and the saved checkpoints are still finite."
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ----- metrics ------------------------------------------------------------------------------------------------
    def _pop_metrics(self, mode: str) -> dict[str, float]:
        """Average the stored metrics over the window and over processes (one collective per log, not per step)."""
        store = self._metrics[mode]
        if not store:
            return {}
        names = sorted(store)
        # NaN marks a step where a metric had no samples (a KTO batch without desirable images): skip those.
        values = [torch.stack(store[name]).float() for name in names]
        local = torch.stack([torch.stack([v.nansum(), (~v.isnan()).sum().float()]) for v in values])
        sums, counts = self.accelerator.reduce(local, reduction="sum").unbind(dim=1)
        store.clear()
        return {name: s / c for name, s, c in zip(names, sums.tolist(), counts.tolist()) if c > 0}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Only the training-loss log takes the metric window; other logs (e.g. a callback's) leave it alone.
        if self.model.training and "loss" in logs:
            logs = {**logs, **self._pop_metrics("train")}
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        draws = getattr(self.data_collator, "draws", None)
        epoch = draws.epoch if draws is not None else None
        if draws is not None:  # precompute_ref_errors: evaluation uses epoch 0's draws
            draws.epoch = 0
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            if draws is not None:
                draws.epoch = epoch
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_metrics("eval").items()})
        return output

    # ----- saving and loading -------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, or, when a write fails (a full disk), an error naming the folder, with the partial
        folder removed (it has no `trainer_state.json`, the file written last): the previous checkpoint stays the last
        one, and older ones are rotated only after a success."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
        except WRITE_ERRORS as exc:
            partial = not os.path.isfile(os.path.join(folder, "trainer_state.json"))
            if self.args.should_save and partial:
                shutil.rmtree(folder, ignore_errors=True)
            raise OSError(f"Could not write the checkpoint {folder} ({exc})"
                          + ("; the partial folder was removed" if partial else "") + ", so the previous checkpoint "
                          "is still the last one. Free disk space (or lower save_total_limit) and resume with "
                          "--resume_from_checkpoint true.") from exc

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        denoiser = self.accelerator.unwrap_model(self.model)
        # `state_dict` is the gathered one under FSDP and DeepSpeed (the module's own parameters are shards there).
        trained = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        if state_dict is not None:
            trained = {name: state_dict[name] for name in trained if name in state_dict}
        self._check_finite_weights(trained, output_dir)
        try:
            self._write_model(output_dir, denoiser, state_dict)
        except WRITE_ERRORS as exc:
            raise OSError(f"Could not save the model to {output_dir}: {exc}") from exc

    def _write_model(self, output_dir: str, denoiser, state_dict) -> None:
        os.makedirs(output_dir, exist_ok=True)
        if self.is_lora:
            # PEFT-format keys (`lora_A`/`lora_B`), as diffusers' own LoRA scripts save for transformers: every
            # `load_lora_weights` reads them, whereas `convert_state_dict_to_diffusers` renames only to_q/k/v/out.0 and
            # a file that mixes both formats loads only partly.
            lora_layers = get_peft_model_state_dict(denoiser, state_dict=state_dict)
            metadata = denoiser.peft_config["default"].to_dict()
            self.family.save_lora_weights(output_dir, lora_layers, metadata)
        else:
            if state_dict is not None:
                # diffusers' save_pretrained writes the module's own tensors: give it a plain module that holds the
                # gathered ones (built on the meta device and assigned, so nothing is copied).
                with torch.device("meta"):
                    denoiser = type(denoiser).from_config(denoiser.config)
                denoiser.load_state_dict(state_dict, assign=True)
            denoiser.save_pretrained(os.path.join(output_dir, self.family.denoiser_name), safe_serialization=True)
        self._write_model_card(output_dir)

    def _check_finite_weights(self, trained: dict[str, torch.Tensor], output_dir: str) -> None:
        """Refuse to write non-finite trained weights: a NaN model must never replace a good checkpoint."""
        trained = list(trained.items())
        if not trained:
            return
        finite = torch.stack([torch.isfinite(p).all() for _, p in trained])
        if not finite.all():
            bad = [name for (name, _), ok in zip(trained, finite.tolist()) if not ok]
            raise FloatingPointError(
                f"Not saving to {output_dir}: {len(bad)} trained tensors hold NaN/inf (e.g. {bad[:3]}) after step "
                f"{self.state.global_step}. Lower learning_rate or beta, set max_grad_norm, or use bf16 instead of "
                "fp16; resume from the last checkpoint."
            )

    def _write_model_card(self, output_dir: str) -> None:
        dataset = getattr(getattr(self.train_dataset, "info", None), "dataset_name", None)
        card = render_model_card(
            base_model=str(self.base_model_id) if self.base_model_id else None,
            pipeline_class=type(self.family.pipeline).__name__,
            denoiser_name=self.family.denoiser_name,
            denoiser_class=type(self.family.denoiser).__name__,
            is_lora=self.is_lora,
            loss_type=self._card_loss_type(),
            hyperparameters={**card_hyperparameters(
                self.args, self.loss_types, self.loss_params, self.state.global_step, self.resolution,
                self.mixed_precision,
                self.accelerator.unwrap_model(self.model).peft_config["default"] if self.is_lora else None,
                self.num_frames,
            ), **self._card_hyperparameters()},
            dataset=dataset,
            video=self.num_frames is not None,
        )
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    def _card_loss_type(self):
        """The method the model card names (a subclass with a loss of its own names it)."""
        return self.args.loss_type

    def _card_hyperparameters(self) -> dict:
        """A subclass's own hyper-parameters for the model card."""
        return {}

    def create_model_card(self, *args, **kwargs) -> None:
        """Called by `push_to_hub`: the card is the one every save writes."""
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the policy only: the reference stays the initial weights (or the adapter-disabled base)."""
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"Cannot resume: checkpoint directory {resume_from_checkpoint!r} does not exist.")
        _check_checkpoint_files(resume_from_checkpoint)
        if self.is_fsdp_enabled:  # the sharded policy from the Trainer's own FSDP checkpoint (pytorch_model_fsdp*)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_lora:
            path = os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"Cannot resume: {path} does not exist (expected a LoRA checkpoint saved by this trainer).")
            _check_safetensors(path)
            state = convert_unet_state_dict_to_peft(self.family.lora_state_dict(resume_from_checkpoint))
            _check_lora_matches(path, state, get_peft_model_state_dict(denoiser))
            set_peft_model_state_dict(denoiser, state, adapter_name="default")
        else:
            path = os.path.join(resume_from_checkpoint, self.family.denoiser_name)
            if not os.path.isdir(path):
                raise ValueError(f"Cannot resume: {path} does not exist (expected a denoiser saved by this trainer).")
            for name in sorted(os.listdir(path)):
                if name.endswith(".safetensors"):
                    _check_safetensors(os.path.join(path, name))
            try:
                saved = type(denoiser).from_pretrained(path, use_safetensors=True)
            except OSError as exc:
                raise ValueError(f"Cannot resume from {path}: no readable safetensors weights ({exc}).") from exc
            try:
                denoiser.load_state_dict(saved.state_dict())
            except RuntimeError as exc:  # another architecture: missing, unexpected or reshaped tensors
                problem = " ".join(str(exc).split())
                raise ValueError(f"Cannot resume: {path} holds another model than this run's: {problem[:300]}") from exc

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class _LongPromptNotice(logging.Filter):
    """diffusers logs the cut-off part of a prompt longer than a text encoder reads on EVERY encode of it, so one
    10,000-character prompt floods the log with its text, epoch after epoch. This keeps those records out and warns
    once per run instead, naming the row."""

    MESSAGE = "The following part of your input was truncated"

    def __init__(self):
        super().__init__()
        self.truncated = self.warned = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.MESSAGE):
            self.truncated = True
            return False
        return True

    @contextmanager
    def watch(self, pipeline, prompts: list[str], rows: torch.Tensor | None):
        logger = logging.getLogger(type(pipeline).__module__)  # the pipeline module's encode_prompt logs it
        self.truncated = False
        logger.addFilter(self)
        try:
            yield
        finally:
            logger.removeFilter(self)
        if self.truncated and not self.warned:
            self.warned = True
            longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            where = f"Row {int(rows[longest])}" if rows is not None else f"Prompt {longest} of a batch"
            warnings.warn(f"{where}: the prompt ({len(prompts[longest])} characters) is longer than the text encoder "
                          "reads, so its end is cut off (warned once per run; any other long prompt is cut alike).")


def _move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)`, casting only when the dtype changes (diffusers warns on every dtype cast of a
    model, even to its own dtype, so an unneeded cast would print a warning on every run) and never for a model loaded
    quantized (it cannot be cast)."""
    if is_quantized(module) or {p.dtype for p in module.parameters()} == {dtype}:
        module.to(device)
    else:
        module.to(device, dtype=dtype)


@contextmanager
def _loaded_whole(args):
    """Load the pipeline unpartitioned under a ZeRO-3 config: transformers partitions every model it loads while one is
    active (`zero.Init`, whatever `zero3_init_flag` says), but DeepSpeed gathers only the model it is given, so the frozen
    text encoders would run with empty weights. The denoiser is partitioned when DeepSpeed takes it."""
    hf_config = getattr(getattr(args, "deepspeed_plugin", None), "dschf", None)
    if hf_config is None or not hf_config.is_zero3():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def _check_lora_matches(path: str, saved: dict, expected: dict) -> None:
    """The checkpoint's adapter must be this run's, key for key and shape for shape: PEFT loads a partial match
    silently (a missing tensor keeps its fresh initialisation), which would resume another run's model or start fresh."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = [f"{key} {tuple(saved[key].shape)} vs {tuple(expected[key].shape)}"
                for key in sorted(set(saved) & set(expected)) if saved[key].shape != expected[key].shape]
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in (
        (missing, "LoRA tensors missing from it"), (unexpected, "unexpected LoRA tensors"),
        (reshaped, "tensors of another shape (another lora_r?), saved vs this run"),
    ) if keys]
    if problems:
        raise ValueError(f"Cannot resume: {path} holds another adapter than this run's: {'; '.join(problems)}. "
                         "Resume with the LoRA settings (lora_r, target modules) it was trained with.")


def _check_checkpoint_files(checkpoint: str) -> None:
    """The Trainer's own files of a checkpoint (state, optimizer, scheduler, RNG) read back before anything is restored,
    so that a truncated or corrupt one is named instead of surfacing as a JSON or zip traceback mid-resume."""
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if name.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"Cannot resume: {path} is missing or unreadable: not valid JSON, truncated or corrupt "
                                 f"({exc}).") from exc
        elif name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            raise ValueError(f"Cannot resume: {path} is missing or unreadable: not a torch.save archive, truncated or "
                             "corrupt.")


def _check_safetensors(path: str) -> None:
    """Open a checkpoint file's header (it must cover the whole file), so a truncated or corrupt file is named."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as exc:  # SafetensorError is not exported under a stable name
        raise ValueError(
            f"Cannot resume: {path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
