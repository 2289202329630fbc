"""`DiffusionDPOTrainer`: a `transformers.Trainer` whose model is the denoiser of a diffusers pipeline.

The trainer knows nothing model-specific (that is the family's job) and no loss math (that is `losses.py`'s): it
draws one noise and one timestep per pair, runs ONE policy forward on winners and losers together and ONE reference
forward on exactly the same inputs, and hands the per-sample errors to the loss. Unpaired losses (KTO) get one noise
and timestep per image instead, and no loss that needs no reference ever runs one.
"""

import copy
import dataclasses
import functools
import os
import warnings
from collections import defaultdict
from contextlib import contextmanager

import datasets
import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import enable_full_determinism, set_seed

from . import losses
from .caching import precompute_latents, precompute_prompt_embeddings
from .config import DiffusionDPOConfig
from .data import (
    PreferenceCollator,
    UnpairedCollator,
    prepare_preference_dataset,
    prepare_unpaired_dataset,
)
from .families import load_family
from .model_card import render_model_card
from .video_data import VideoPreferenceCollator, VideoUnpairedCollator, check_num_frames

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
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
            for `loss_type="kto"`, labelled images (`prompt`, `image`, `label` True when desirable).
        Other arguments are those of `transformers.Trainer`.
    """

    _tag_names = ["diffusion-dpo", "diffusers"]

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
        # Seed before the adapter is initialised, so one seed gives one run (Trainer seeds only after this).
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        self.family = load_family(model, args.model_init_kwargs, args.max_prompt_length, args)
        # Resolved once; everything reads `self.beta`, never `args.beta` (None means the family's default).
        self.beta = float(args.beta) if args.beta is not None else float(self.family.default_beta)
        self.base_model_id = model if isinstance(model, (str, os.PathLike)) else self.family.pipeline.name_or_path
        self.loss_types = losses.resolve_loss_types(args.loss_type, args.loss_weights)
        self.paired = losses.is_paired(self.loss_types)
        self.loss_params = losses.LossParams.from_config(args, beta=self.beta)
        denoiser = self.family.denoiser

        for module in self.family.frozen_modules:
            module.requires_grad_(False)
            module.eval()
        if peft_config is not None:
            if hasattr(peft_config, "target_modules") and peft_config.target_modules is None:
                # The family's documented default targets (attention projections).
                peft_config = dataclasses.replace(peft_config, target_modules=list(self.family.lora_target_modules))
            denoiser.requires_grad_(False)
            denoiser.add_adapter(peft_config)
        self.is_lora = bool(getattr(denoiser, "peft_config", None))

        self.ref_model = None
        if losses.needs_reference(self.loss_types):
            if ref_model is not None:
                self.ref_model = self._load_reference(ref_model, args)
            elif not self.is_lora:
                self.ref_model = copy.deepcopy(denoiser)
            if self.ref_model is not None:
                self.ref_model.requires_grad_(False)
                self.ref_model.eval()
        elif ref_model is not None:
            warnings.warn(f"`ref_model` is ignored: loss_type {args.loss_type!r} needs no reference model.")

        self.weight_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        if self.is_lora and self.weight_dtype != torch.float32:
            # Frozen base weights in half precision; the adapter stays in float32 for stable updates. A denoiser loaded
            # in that dtype is left as loaded: diffusers keeps some modules in float32 (Wan's norms, rope, time
            # embedding).
            if denoiser.dtype != self.weight_dtype:
                denoiser.to(dtype=self.weight_dtype)
            cast_training_params(denoiser, dtype=torch.float32)

        if args.activation_checkpointing:
            # Diffusers models have their own switch; the Trainer only knows the transformers one, so give it that.
            denoiser.enable_gradient_checkpointing()
            denoiser.activation_checkpointing_enable = lambda **_: None

        self.resolution = args.resolution or self.family.native_resolution()
        if self.resolution % self.family.resolution_multiple():
            raise ValueError(
                f"resolution={self.resolution} must be a multiple of {self.family.resolution_multiple()} for "
                f"{type(self.family.pipeline).__name__}."
            )
        prepare_dataset = prepare_preference_dataset if self.paired else prepare_unpaired_dataset
        if self.family.temporal_compression is not None:  # a video model
            self.num_frames = self.family.default_num_frames if args.num_frames is None else args.num_frames
            check_num_frames(self.num_frames, self.family.temporal_compression)
            if not self.paired:
                prepare_dataset = functools.partial(prepare_unpaired_dataset, column="video")
            if data_collator is None:
                collator_class = VideoPreferenceCollator if self.paired else VideoUnpairedCollator
                data_collator = collator_class(self.resolution, self.num_frames, args.frame_stride, args.video_fps,
                                               args.random_crop, args.random_flip)
        elif data_collator is None:
            collator_class = PreferenceCollator if self.paired else UnpairedCollator
            data_collator = collator_class(self.resolution, args.random_crop, args.random_flip)
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare_dataset(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, "eval_dataset")

        super().__init__(
            model=denoiser,
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

        device = self.accelerator.device
        # A half-precision VAE overflows in fp16 (the known SDXL VAE NaNs); bf16 is safe.
        vae_dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.family.vae.to(device, dtype=vae_dtype)
        for encoder in self.family.text_encoders:
            encoder.to(device, dtype=self.weight_dtype)
        if self.ref_model is not None:
            self.ref_model.to(device, dtype=self.weight_dtype)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._precompute()

    @property
    def pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline being trained (its denoiser is `self.model`), e.g. to sample from the policy."""
        return self.family.pipeline

    # ----- construction helpers -----------------------------------------------------------------------------------
    def _load_reference(self, ref_model, args) -> torch.nn.Module:
        name = self.family.denoiser_name
        if isinstance(ref_model, DiffusionPipeline):
            return getattr(ref_model, name)
        if isinstance(ref_model, torch.nn.Module):
            return ref_model
        if isinstance(ref_model, (str, os.PathLike)):
            kwargs = dict(args.ref_model_init_kwargs or {})
            return type(self.family.denoiser).from_pretrained(ref_model, subfolder=name, use_safetensors=True, **kwargs)
        raise TypeError(f"`ref_model` must be a pipeline, a module or an id/path, got {type(ref_model).__name__}.")

    @contextmanager
    def _reference(self, model):
        """The reference denoiser: the explicit/frozen copy, or the policy with its adapters switched off."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        denoiser, layers = self._adapter_layers(model)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield denoiser
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def _adapter_layers(self, model) -> tuple[torch.nn.Module, list[BaseTunerLayer]]:
        """The unwrapped denoiser and its LoRA layers, found once per model object: `unwrap_model` and
        `disable_adapters()` each walk every module (~2000 in SD1.5's UNet) on every call."""
        cache = getattr(self, "_adapter_layer_cache", None)
        if cache is None or cache[0] is not model:
            denoiser = self.accelerator.unwrap_model(model)
            layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
            self._adapter_layer_cache = cache = (model, denoiser, layers)
        return cache[1], cache[2]

    def _precompute(self) -> None:
        """Encode images and/or prompts once (main process first; `datasets` caches the result), then train from the
        cache with the encoders moved off the accelerator. See `caching.py` for what is stored."""
        args = self.args
        if not (args.precompute_latents or args.precompute_text_embeddings):
            return
        if not isinstance(self.data_collator, PreferenceCollator):  # UnpairedCollator is one too
            raise TypeError("precompute_latents/precompute_text_embeddings need the default collator "
                            "(PreferenceCollator, or UnpairedCollator for kto).")
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        if any(isinstance(d, datasets.IterableDataset) for d in (self.train_dataset, *evals)):
            raise ValueError("precompute_latents/precompute_text_embeddings need a map-style datasets.Dataset: a "
                             "streamed dataset is read once per pass, so there is nothing to store and reuse.")
        with args.main_process_first(desc="precomputing latents and prompt embeddings"):
            if args.precompute_latents:
                def encode(dataset):
                    return precompute_latents(dataset, self.family, self.resolution, args.random_crop,
                                              args.random_flip, args.seed, args.per_device_train_batch_size,
                                              collator=self.data_collator)
                if self.train_dataset is not None:
                    self.train_dataset = encode(self.train_dataset)
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {k: encode(v) for k, v in self.eval_dataset.items()}
                elif self.eval_dataset is not None:
                    self.eval_dataset = encode(self.eval_dataset)
                self.family.vae.to("cpu")
            if args.precompute_text_embeddings:
                evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
                every = [d for d in (self.train_dataset, *evals) if d is not None]
                self.data_collator.prompt_embeddings = precompute_prompt_embeddings(
                    every, self.family, self.accelerator.device, args.per_device_train_batch_size
                )
                for encoder in self.family.text_encoders:
                    encoder.to("cpu")

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

    def _latents(self, inputs) -> torch.Tensor:
        """Denoiser-space latents of winners then losers, sampled from the VAE's latent distribution."""
        if "chosen_latent_mean" in inputs:  # precomputed: the same distribution, no VAE call
            mean = torch.cat([inputs["chosen_latent_mean"], inputs["rejected_latent_mean"]])
            std = torch.cat([inputs["chosen_latent_std"], inputs["rejected_latent_std"]])
        else:
            pixels = torch.cat([inputs["chosen_pixel_values"], inputs["rejected_pixel_values"]])
            mean, std = self.family.encode_pixels(pixels)
        return self._sample_latents(mean, std, groups=2)

    def _sample_latents(self, mean, std, groups: int) -> torch.Tensor:
        """mean + std * eps, with eps drawn for the global batch (`groups` blocks: winners, losers) in a fixed layout,
        so the draw depends neither on the process count nor on the memory layout of a cached or fresh encoding."""
        per_group = mean.shape[0] // groups
        shape = (groups, per_group * self.accelerator.num_processes, *mean.shape[1:])
        eps = self._own_share(torch.randn(shape, device=mean.device, dtype=mean.dtype), dim=1).reshape(mean.shape)
        # Contiguous latents: a channels-last VAE output (CPU) would otherwise send the denoiser down other kernels.
        return self.family.scale_latents(mean.contiguous() + std.contiguous() * eps)

    def _prompt_embeddings(self, inputs) -> dict[str, torch.Tensor]:
        if "prompt_embeds" in inputs:  # precomputed, stored in float32: back to the text encoders' dtype
            return {key: value.to(self.weight_dtype) for key, value in inputs["prompt_embeds"].items()}
        return self.family.encode_prompt(inputs["prompt"], self.accelerator.device)

    def _conditioning(self, inputs) -> dict[str, torch.Tensor]:
        conditioning = {key: torch.cat([value, value]) for key, value in self._prompt_embeddings(inputs).items()}
        conditioning.update(self.family.time_conditioning(inputs, self.resolution, self.accelerator.device))
        return conditioning

    def _denoising_errors(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample mse of policy and reference, shape (2B,): winners first, then losers."""
        x0 = self._latents(inputs)
        conditioning = self._conditioning(inputs)
        pairs = x0.shape[0] // 2
        # ONE noise and ONE timestep per pair, shared by winner, loser, policy and reference.
        world = self.accelerator.num_processes
        noise = self._own_share(torch.randn((world * pairs, *x0.shape[1:]), device=x0.device, dtype=x0.dtype))
        noise = noise.repeat(2, *([1] * (x0.ndim - 1)))
        timesteps = self._own_share(self.family.sample_timesteps(world * pairs, x0.device)).repeat(2)
        return self._policy_and_reference_errors(model, x0, noise, timesteps, conditioning)

    def _unpaired_denoising_errors(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image mse of policy and reference, shape (N,): unpaired images are independent, so each gets its own
        noise and timestep (still shared by policy and reference)."""
        if "latent_mean" in inputs:  # precomputed: the same distribution, no VAE call
            mean, std = inputs["latent_mean"], inputs["latent_std"]
        else:
            mean, std = self.family.encode_pixels(inputs["pixel_values"])
        x0 = self._sample_latents(mean, std, groups=1)
        conditioning = dict(self._prompt_embeddings(inputs))
        conditioning.update(self.family.time_conditioning(inputs, self.resolution, self.accelerator.device))
        world = self.accelerator.num_processes
        noise = self._own_share(torch.randn((world * x0.shape[0], *x0.shape[1:]), device=x0.device, dtype=x0.dtype))
        timesteps = self._own_share(self.family.sample_timesteps(world * x0.shape[0], x0.device))
        return self._policy_and_reference_errors(model, x0, noise, timesteps, conditioning)

    def _policy_and_reference_errors(self, model, x0, noise, timesteps, conditioning):
        """ONE policy forward and, only when a selected loss needs it, ONE reference forward on the same inputs."""
        noisy, target = self.family.noisy_latents_and_target(x0, noise, timesteps)
        policy_mse = losses.per_sample_mse(self.family.predict(model, noisy, timesteps, conditioning), target)
        ref_mse = None
        if losses.needs_reference(self.loss_types):
            with torch.no_grad(), self._reference(model) as reference:
                ref_mse = losses.per_sample_mse(self.family.predict(reference, noisy, timesteps, conditioning), target)
        return policy_mse, ref_mse

    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the batches of all processes (sum and count gathered, so uneven last batches are fine)."""
        stats = torch.stack([values.sum(), values.new_tensor(float(values.numel()))]).float()
        total = self.accelerator.gather(stats[None]).sum(dim=0)
        return total[0] / total[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.paired:
            with self.accelerator.autocast():
                policy_mse, ref_mse = self._denoising_errors(model, inputs)
            loss, metrics = losses.compute_paired_loss(self.loss_types, policy_mse, ref_mse, self.loss_params)
        else:
            with self.accelerator.autocast():
                policy_mse, ref_mse = self._unpaired_denoising_errors(model, inputs)
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
        precision = "fp16" if self.args.fp16 else "bf16" if self.args.bf16 else "fp32"
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
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_metrics("eval").items()})
        return output

    # ----- saving and loading -------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        denoiser = self.accelerator.unwrap_model(self.model)
        self._check_finite_weights(denoiser, output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if self.is_lora:
            # PEFT-format keys (`lora_A`/`lora_B`), as diffusers' own LoRA scripts save for transformers: every
            # `load_lora_weights` reads them, whereas `convert_state_dict_to_diffusers` renames only to_q/k/v/out.0 and
            # a file that mixes both formats loads only partly. `state_dict` is the gathered one under FSDP and ZeRO-3.
            lora_layers = get_peft_model_state_dict(denoiser, state_dict=state_dict)
            metadata = denoiser.peft_config["default"].to_dict()
            self.family.save_lora_weights(output_dir, lora_layers, metadata)
        else:
            denoiser.save_pretrained(os.path.join(output_dir, self.family.denoiser_name), safe_serialization=True)
        self._write_model_card(output_dir)

    def _check_finite_weights(self, denoiser: torch.nn.Module, output_dir: str) -> None:
        """Refuse to write non-finite trained weights: a NaN model must never replace a good checkpoint."""
        trained = [(name, p) for name, p in denoiser.named_parameters() if p.requires_grad]
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
            loss_type=self.args.loss_type,
            hyperparameters=self._card_hyperparameters(),
            dataset=dataset,
            video=self.family.temporal_compression is not None,
        )
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    def _card_hyperparameters(self) -> dict:
        """What it takes to reproduce the run: the selected losses' own values, then the optimisation settings."""
        args = self.args
        values = losses.loss_hyperparameters(self.loss_types, self.loss_params)
        values.update({
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "optim": getattr(args.optim, "value", args.optim),
            # pairs (images for kto) per optimizer step, over all processes
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size,
            "steps": self.state.global_step,
            "resolution": self.resolution,
            **({"num_frames": self.num_frames} if self.family.temporal_compression is not None else {}),
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            "seed": args.seed,
        })
        if self.is_lora:
            lora = self.accelerator.unwrap_model(self.model).peft_config["default"]
            values.update({"lora_rank": lora.r, "lora_alpha": lora.lora_alpha,
                           "lora_target_modules": sorted(lora.target_modules)})
        return values

    def create_model_card(self, *args, **kwargs) -> None:
        """Called by `push_to_hub`: the card is the one every save writes."""
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the policy only: the reference stays the initial weights (or the adapter-disabled base)."""
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"Cannot resume: checkpoint directory {resume_from_checkpoint!r} does not exist.")
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_lora:
            path = os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"Cannot resume: {path} does not exist (expected a LoRA checkpoint saved by this trainer).")
            _check_safetensors(path)
            state = convert_unet_state_dict_to_peft(self.family.lora_state_dict(resume_from_checkpoint))
            result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: unexpected LoRA keys {unexpected[:5]}.")
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
            denoiser.load_state_dict(saved.state_dict())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _check_safetensors(path: str) -> None:
    """Open a checkpoint file's header (it must cover the whole file), so a truncated or corrupt file is named."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as exc:  # SafetensorError is not exported under a stable name
        raise ValueError(
            f"Cannot resume: {path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
