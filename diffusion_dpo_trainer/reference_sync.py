"""A reference that follows the policy (TR-DPO, TRL's `sync_ref_model`): ref <- alpha * policy + (1 - alpha) * ref
every `ref_model_sync_steps` optimizer steps, and its place in checkpoints.

With LoRA the reference is a second adapter ('ref') on the policy's own denoiser (as Flow-GRPO keeps its reference),
created equal to the policy's initial adapter, so a sync mixes adapter parameters; with a full fine-tune it is the
trainer's frozen copy. The family's `reference()` switches to it (`family.reference_adapter`).
"""

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

REFERENCE_ADAPTER = "ref"
REFERENCE_WEIGHTS = "reference.safetensors"


class SyncedReference(TrainerCallback):
    """The synced reference of `trainer`; as a callback, it syncs after the optimizer step, before the step's
    checkpoint is written (TRL's `SyncRefModelCallback` timing)."""

    def __init__(self, trainer):
        self.trainer = trainer
        if trainer.is_lora:
            denoiser = trainer.family.denoiser
            denoiser.add_adapter(denoiser.peft_config["default"], adapter_name=REFERENCE_ADAPTER)
            denoiser.set_adapter("default")  # trainable again; the reference adapter is frozen
            for name, parameter in denoiser.named_parameters():
                if f".{REFERENCE_ADAPTER}." in name:
                    parameter.requires_grad_(False)
            trainer.family.reference_adapter = REFERENCE_ADAPTER
            self.sync(alpha=1.0)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(reference parameter, policy parameter) for every parameter a sync moves."""
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.is_lora:
            named = dict(policy.named_parameters())
            return [(named[name.replace(".default.", f".{REFERENCE_ADAPTER}.")], p)
                    for name, p in named.items() if ".default." in name]
        return list(zip(trainer.ref_model.parameters(), policy.parameters(), strict=True))

    @torch.no_grad()
    def sync(self, alpha: float) -> None:
        for reference, policy in self.pairs():
            reference.lerp_(policy.to(reference.dtype), alpha)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            self.sync(args.ref_model_mixup_alpha)

    def save(self, folder: str) -> None:
        save_file({str(i): ref.detach().contiguous() for i, (ref, _) in enumerate(self.pairs())},
                  os.path.join(folder, REFERENCE_WEIGHTS))

    @torch.no_grad()
    def load(self, folder: str) -> None:
        path = os.path.join(folder, REFERENCE_WEIGHTS)
        if not os.path.isfile(path):
            raise ValueError(f"Cannot resume: {path} does not exist (a sync_ref_model run saves its reference).")
        saved = load_file(path)
        for i, (reference, _) in enumerate(self.pairs()):
            reference.copy_(saved[str(i)])
