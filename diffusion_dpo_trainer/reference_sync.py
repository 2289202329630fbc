"""A reference that follows the policy (TR-DPO, TRL's `sync_ref_model`): ref <- alpha * policy + (1 - alpha) * ref
every `ref_model_sync_steps` optimizer steps, and its place in checkpoints.

With LoRA the reference is a second adapter ('ref') on the policy's own denoiser (as Flow-GRPO keeps its reference),
created equal to the policy's initial adapter, so a sync mixes adapter parameters; with a full fine-tune it is the
trainer's frozen copy. The family's `reference()` switches to it (`family.reference_adapter`).
"""

import os

import torch
from transformers import TrainerCallback

from .adapter_copy import adapter_pairs, add_adapter_copy, load_tensors, save_tensors

REFERENCE_ADAPTER = "ref"
REFERENCE_WEIGHTS = "reference.safetensors"


class SyncedReference(TrainerCallback):
    """The synced reference of `trainer`; as a callback, it syncs after the optimizer step, before the step's
    checkpoint is written (TRL's `SyncRefModelCallback` timing)."""

    def __init__(self, trainer):
        self.trainer = trainer
        if trainer.is_lora:
            add_adapter_copy(trainer.family.denoiser, REFERENCE_ADAPTER)
            trainer.family.reference_adapter = REFERENCE_ADAPTER

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(reference parameter, policy parameter) for every parameter a sync moves."""
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.is_lora:
            return adapter_pairs(policy, REFERENCE_ADAPTER)
        return list(zip(trainer.ref_model.parameters(), policy.parameters(), strict=True))

    @torch.no_grad()
    def sync(self, alpha: float) -> None:
        for reference, policy in self.pairs():
            reference.lerp_(policy.to(reference.dtype), alpha)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            self.sync(args.ref_model_mixup_alpha)

    def save(self, folder: str) -> None:
        save_tensors([reference for reference, _ in self.pairs()], os.path.join(folder, REFERENCE_WEIGHTS))

    def load(self, folder: str) -> None:
        load_tensors([reference for reference, _ in self.pairs()], os.path.join(folder, REFERENCE_WEIGHTS),
                     "a sync_ref_model run saves its reference")
