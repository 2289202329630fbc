"""adapter_copy: the frozen copy of the policy's LoRA adapter that the synced reference and NFT's old policy are."""

import pytest
import torch
from diffusers import ModelMixin
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig

from diffusion_dpo_trainer.adapter_copy import adapter_pairs, add_adapter_copy, load_tensors, save_tensors


class TinyDenoiser(ModelMixin, PeftAdapterMixin):  # a diffusers model, as every family's denoiser (diffusers' add_adapter API)
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)


def tiny_lora_model():
    torch.manual_seed(0)
    model = TinyDenoiser()
    model.add_adapter(LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights="gaussian"))
    return model


def test_the_copy_equals_the_policy_is_frozen_and_leaves_the_policy_trainable():
    model = tiny_lora_model()
    add_adapter_copy(model, "old", torch.float64)
    pairs = adapter_pairs(model, "old")
    assert len(pairs) == 4  # lora_A and lora_B of two layers
    for copy, policy in pairs:
        assert copy is not policy and copy.dtype == torch.float64 and not copy.requires_grad
        assert policy.requires_grad
        torch.testing.assert_close(copy, policy.double(), rtol=0, atol=0)
    assert model.active_adapters() == ["default"]


def test_saved_tensors_come_back_exactly_and_a_mismatch_is_refused_by_name(tmp_path):
    model = tiny_lora_model()
    add_adapter_copy(model, "ref")
    copies = [copy for copy, _ in adapter_pairs(model, "ref")]
    save_tensors(copies, str(tmp_path / "ref.safetensors"))
    expected = [c.detach().clone() for c in copies]
    with torch.no_grad():
        for c in copies:
            c.add_(1.0)
    load_tensors(copies, str(tmp_path / "ref.safetensors"), "a test")
    for c, e in zip(copies, expected, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"missing.safetensors does not exist \(a test\)"):
        load_tensors(copies, str(tmp_path / "missing.safetensors"), "a test")
    with pytest.raises(ValueError, match="another LoRA configuration"):
        load_tensors(copies[:3], str(tmp_path / "ref.safetensors"), "a test")
    with pytest.raises(ValueError, match="another LoRA configuration"):
        load_tensors([torch.zeros(3, 3)] + copies[1:], str(tmp_path / "ref.safetensors"), "a test")
