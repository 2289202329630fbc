"""The family conformance suite: what "supported" means. Every registered family passes every test here on its tiny
offline pipeline (built by the builder registered for its pipeline class in `diffusion_dpo_trainer.testing`).

Family-specific facts (SDXL time ids, FLUX guidance and packing, flow noising) are tested in their own modules.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import LN2, DenoiserRecorder, assert_cached_run_matches_uncached, lora, losses_of, make_args, render
from peft import get_peft_model_state_dict

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.families import REGISTRY, DiffusionFamily, FlowMatchingFamily
from diffusion_dpo_trainer.testing import TINY_BUILDERS, TINY_CALL_KWARGS, TINY_DATA, make_preference_dataset

PIPELINE_CLASSES = sorted(REGISTRY)


def test_every_registered_family_has_a_tiny_builder():
    missing = [name for name in PIPELINE_CLASSES if name not in TINY_BUILDERS]
    assert not missing, f"register a tiny builder (diffusion_dpo_trainer/testing/) for {missing}"


@pytest.fixture(scope="module", params=PIPELINE_CLASSES)
def built(request, tmp_path_factory):
    """(pipeline class name, saved tiny pipeline path, its preference pairs)."""
    name = request.param
    if name not in TINY_BUILDERS:
        pytest.fail(f"no tiny builder is registered for {name}")
    path = TINY_BUILDERS[name](tmp_path_factory.mktemp(name) / "pipe")
    data = TINY_DATA.get(name, make_preference_dataset)(n=8, size=32)
    return name, path, data


def family_lora():
    return lora(target_modules=None)  # the family's documented default targets


def args_for(name, tmp_path, **overrides):
    """`make_args`, with a video family's clip length equal to the one its tiny pipeline samples (`num_frames`)."""
    frames = TINY_CALL_KWARGS.get(name, {}).get("num_frames")
    return make_args(tmp_path, **({"num_frames": frames} if frames is not None else {}), **overrides)


def test_lora_first_loss_is_ln2_and_the_saved_adapter_loads(tmp_path, built):
    name, path, data = built
    args = args_for(name, tmp_path, max_steps=3)
    trainer = DiffusionDPOTrainer(model=path, args=args, train_dataset=data, peft_config=family_lora())
    assert type(trainer.family.pipeline).__name__ == name
    assert trainer.beta == type(trainer.family).default_beta
    trainer.train()
    # The adapter starts as a no-op and the reference is the adapter switched off: the first loss is exactly ln 2.
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    first = trainer.state.log_history[0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(x) for x in losses_of(trainer))
    trainer.save_model()

    trained = get_peft_model_state_dict(trainer.family.denoiser)
    targets = type(trainer.family).lora_target_modules
    for target in targets:  # every default target module is trained (e.g. both streams of a joint attention)
        assert any(f".{target}." in key for key in trained), target
    fresh = DiffusionPipeline.from_pretrained(path)
    call_kwargs = TINY_CALL_KWARGS.get(name, {})
    without = render(fresh, **call_kwargs)
    fresh.load_lora_weights(args.output_dir, adapter_name="dpo")
    loaded = get_peft_model_state_dict(getattr(fresh, trainer.family.denoiser_name), adapter_name="dpo")
    assert loaded.keys() == trained.keys()  # every trained layer loads, none is dropped
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)
    assert not np.allclose(without, render(fresh, **call_kwargs)), "the loaded LoRA does not change the output"
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert name in card and f"beta = {trainer.beta:g}" in card


def test_policy_and_reference_see_identical_inputs_and_one_draw_per_pair(tmp_path, built):
    name, path, data = built
    args = args_for(name, tmp_path, max_steps=2)
    trainer = DiffusionDPOTrainer(model=path, args=args, train_dataset=data, peft_config=family_lora())
    with DenoiserRecorder(trainer) as recorded:
        trainer.train()

    assert len(recorded.calls) == 2 * args.max_steps  # one policy and one reference forward per step
    n = args.per_device_train_batch_size
    for step in range(args.max_steps):
        policy, reference = recorded.calls[2 * step], recorded.calls[2 * step + 1]
        assert policy.keys() == reference.keys() and len(policy) >= 3  # latents, timestep, conditioning
        for key in policy:
            assert torch.equal(policy[key], reference[key]), key
        noise, timesteps, sigmas = recorded.draws[step]
        assert noise.shape[0] == timesteps.shape[0] == 2 * n
        assert torch.equal(noise[:n], noise[n:]) and not torch.equal(noise[0], noise[1])
        assert torch.equal(timesteps[:n], timesteps[n:])
        if isinstance(trainer.family, FlowMatchingFamily):
            assert torch.equal(sigmas[:n], sigmas[n:]) and ((sigmas > 0) & (sigmas <= 1)).all()


def test_full_finetune_saves_a_denoiser_that_reloads(tmp_path, built):
    name, path, data = built
    args = args_for(name, tmp_path, max_steps=2)
    trainer = DiffusionDPOTrainer(model=path, args=args, train_dataset=data)
    denoiser = trainer.family.denoiser
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    assert trainer.ref_model is not None and trainer.ref_model is not denoiser  # a frozen copy
    trainer.train()
    # Policy == frozen copy at step 1. Only Sana's linear attention takes another CPU kernel when its weights require
    # grad (outputs differ by ~1e-7, which beta turns into ~1e-5 of loss); every other family is exact to 1e-6.
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-4 if name == "SanaPipeline" else 1e-6)
    trainer.save_model()

    subfolder = trainer.family.denoiser_name
    reloaded = type(denoiser).from_pretrained(args.output_dir, subfolder=subfolder)
    trained = denoiser.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the denoiser did not train"
    for key, value in trained.items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    for key, value in trainer.ref_model.state_dict().items():  # the reference never moved
        assert torch.equal(value, before[key]), key
    pipe = DiffusionPipeline.from_pretrained(path, **{subfolder: reloaded})
    assert np.isfinite(render(pipe, **TINY_CALL_KWARGS.get(name, {}))).all()


def test_a_resolution_off_the_models_grid_names_the_multiple(tmp_path, built):
    name, path, data = built
    trainer = DiffusionDPOTrainer(model=path, args=args_for(name, tmp_path), train_dataset=data)
    multiple = trainer.family.resolution_multiple()
    assert multiple > 1
    bad = 32 + multiple // 2
    with pytest.raises(ValueError, match=rf"resolution={bad} must be a multiple of {multiple} for {name}"):
        DiffusionDPOTrainer(model=path, args=args_for(name, tmp_path, resolution=bad), train_dataset=data)


def test_cached_latents_and_embeddings_give_the_same_losses_without_the_encoders(tmp_path, built):
    """Same seed, full fine-tune (so losses move), flips on: the cache stores the VAE's mean and std and the prompt
    embeddings; a cached run never calls the VAE or a text encoder and logs the same loss at every step."""
    name, path, data = built

    def make_trainer(cached):
        args = args_for(name, tmp_path / str(cached), max_steps=3, random_flip=True, precompute_latents=cached,
                        precompute_text_embeddings=cached)
        return DiffusionDPOTrainer(model=path, args=args, train_dataset=data, eval_dataset=data.select(range(2)))

    assert_cached_run_matches_uncached(make_trainer, "chosen")


# ----- the family interface itself ----------------------------------------------------------------------------------
def test_a_family_missing_an_attribute_or_method_fails_when_defined():
    with pytest.raises(TypeError, match=r"IncompleteFamily does not define .*default_beta.*lora_target_modules"):
        class IncompleteFamily(DiffusionFamily):
            pipeline_class_names = ("NoSuchPipeline",)
            denoiser_name = "unet"

            def encode_prompt(self, prompts, device):
                return {}

            def sample_timesteps(self, batch_size, device):
                return torch.zeros(batch_size)

            def noisy_latents_and_target(self, x0, noise, timesteps):
                return x0, noise

            def predict(self, denoiser, noisy_latents, timesteps, conditioning):
                return noisy_latents

    with pytest.raises(TypeError, match=r"NoPredictFamily does not define predict"):
        class NoPredictFamily(DiffusionFamily):
            pipeline_class_names = ("NoSuchPipeline",)
            denoiser_name, default_beta, lora_target_modules = "unet", 1.0, ("to_q",)

            def encode_prompt(self, prompts, device):
                return {}

            def sample_timesteps(self, batch_size, device):
                return torch.zeros(batch_size)

            def noisy_latents_and_target(self, x0, noise, timesteps):
                return x0, noise
    assert "NoSuchPipeline" not in REGISTRY  # neither was registered


def test_a_pipeline_class_is_trained_by_one_family_only():
    existing = PIPELINE_CLASSES[0]
    with pytest.raises(TypeError, match=rf"already trained by.*{REGISTRY[existing].__name__}"):
        class Duplicate(REGISTRY[existing]):
            pipeline_class_names = (existing,)
