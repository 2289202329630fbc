"""A frozen copy of the policy's LoRA adapter under another name, on the policy's own denoiser: TR-DPO's synced
reference ('ref', `reference_sync.py`) and DiffusionNFT's old policy ('old', `nft_trainer.py`).

A copy costs one adapter's parameters, not a second model; the family switches to it with `adapter_active(name)` (or
`reference()`). It is moved towards the policy parameter by parameter (`pairs`) and kept in checkpoints as one
safetensors file whose tensors are numbered in `pairs` order (`save_tensors` / `load_tensors`).
"""

import os

import torch
from safetensors.torch import load_file, save_file


def add_adapter_copy(denoiser, name: str, dtype: torch.dtype | None = None) -> None:
    """Add adapter `name` with the policy's ('default') LoRA config, frozen (in `dtype` if given), equal to the policy;
    'default' stays the trained, active adapter."""
    denoiser.add_adapter(denoiser.peft_config["default"], adapter_name=name)
    denoiser.set_adapter("default")  # trainable again (set_adapter makes the named adapter the trainable one)
    for parameter_name, parameter in denoiser.named_parameters():
        if f".{name}." in parameter_name:
            parameter.requires_grad_(False)
            if dtype is not None:
                parameter.data = parameter.data.to(dtype)
    with torch.no_grad():
        for copy, policy in adapter_pairs(denoiser, name):
            copy.copy_(policy)


def adapter_pairs(model: torch.nn.Module, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(copy parameter, policy parameter) for every parameter of the policy's LoRA adapter, in a fixed order."""
    named = dict(model.named_parameters())
    return [(named[key.replace(".default.", f".{name}.")], p) for key, p in named.items() if ".default." in key]


def save_tensors(tensors: list[torch.Tensor], path: str) -> None:
    save_file({str(i): t.detach().contiguous() for i, t in enumerate(tensors)}, path)


@torch.no_grad()
def load_tensors(tensors: list[torch.Tensor], path: str, what: str) -> None:
    """Copy the saved tensors into `tensors`, refusing a missing file or one from another LoRA configuration by name
    (`what` says which checkpoint file this is, for the message)."""
    if not os.path.isfile(path):
        raise ValueError(f"Cannot resume: {path} does not exist ({what}).")
    saved = load_file(path)
    if len(saved) != len(tensors) or any(saved[str(i)].shape != t.shape for i, t in enumerate(tensors)):
        raise ValueError(f"Cannot resume: {path} holds {len(saved)} tensors that do not match the {len(tensors)} "
                         "parameters they restore (another LoRA configuration?).")
    for i, tensor in enumerate(tensors):
        tensor.copy_(saved[str(i)])
