"""Qwen-Image, Z-Image and Sana on tiny offline pipelines: the family conformance checks (ln 2 with LoRA, identical
policy/reference inputs, one draw per pair, diffusers-format LoRA, full fine-tune, cache = no cache), the published
shift reaching the transformer, and the family's prediction driving each pipeline's own sampler."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LN2, forbid, lora, make_args
from diffusers import DiffusionPipeline
from peft import get_peft_model_state_dict

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.families import QwenImageFamily, SanaFamily, ZImageFamily, load_family
from diffusion_dpo_trainer.testing import make_preference_dataset
from diffusion_dpo_trainer.testing_qwenimage import build_tiny_qwenimage_pipeline
from diffusion_dpo_trainer.testing_sana import build_tiny_sana_pipeline
from diffusion_dpo_trainer.testing_zimage import build_tiny_zimage_pipeline

BUILDERS = {"qwenimage": build_tiny_qwenimage_pipeline, "zimage": build_tiny_zimage_pipeline,
            "sana": build_tiny_sana_pipeline}
FAMILY = {"qwenimage": QwenImageFamily, "zimage": ZImageFamily, "sana": SanaFamily}
NAMES = sorted(BUILDERS)
# Sampling options that make each pipeline run one plain conditional prediction per step at 32 px.
PLAIN_SAMPLING = {"qwenimage": {}, "zimage": {"guidance_scale": 0.0},
                  "sana": {"guidance_scale": 1.0, "use_resolution_binning": False}}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name) / "pipe") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def varied_pairs():
    """Pairs whose prompts differ in length, so prompt padding and masks are exercised within a batch."""
    long = " with a plain white background in a photo"
    return make_preference_dataset(n=8, size=32).map(
        lambda row, i: {"prompt": row["prompt"] + (long if i % 2 else "")}, with_indices=True
    )


def family_lora():
    return lora(target_modules=None)  # the family's documented defaults


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def render(pipe, name):
    generator = torch.Generator().manual_seed(0)
    return pipe("a solid red square", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=generator, **PLAIN_SAMPLING[name]).images


def tensors_of(args, kwargs):
    """Every tensor a module call received, lists (Z-Image's per-image inputs) flattened, in a fixed order."""
    values = [*args, *(kwargs[k] for k in sorted(kwargs))]
    flat = []
    for value in values:
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return [v.detach().clone() for v in flat if isinstance(v, torch.Tensor)]


# ----- conformance -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_lora_first_loss_is_ln2_and_the_adapter_loads_into_the_pipeline(tmp_path, name, paths, varied_pairs):
    args = make_args(tmp_path, max_steps=3)
    trainer = DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=varied_pairs, peft_config=family_lora())
    assert isinstance(trainer.family, FAMILY[name]) and trainer.beta == FAMILY[name].default_beta
    trainer.train()
    # The adapter starts as a no-op and the reference is the adapter switched off: loss is exactly ln 2.
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(x) for x in losses_of(trainer))
    trainer.save_model()

    trained = get_peft_model_state_dict(trainer.family.denoiser)
    assert all(any(f".{m}." in k for k in trained) for m in FAMILY[name].lora_target_modules)
    fresh = DiffusionPipeline.from_pretrained(paths[name])
    without = render(fresh, name)
    fresh.load_lora_weights(args.output_dir, adapter_name="dpo")
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name="dpo")
    assert loaded.keys() == trained.keys()  # every trained layer loads, none is dropped
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)
    assert not np.allclose(without, render(fresh, name)), "the loaded LoRA does not change the output"
    card = Path(args.output_dir, "README.md").read_text(encoding="utf-8")
    assert type(fresh).__name__ in card and f"beta = {trainer.beta:g}" in card


@pytest.mark.parametrize("name", NAMES)
def test_policy_and_reference_get_identical_inputs_and_one_draw_per_pair(tmp_path, name, paths, varied_pairs):
    args = make_args(tmp_path)
    trainer = DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=varied_pairs, peft_config=family_lora())
    family, calls, draws = trainer.family, [], []
    handle = family.denoiser.register_forward_pre_hook(
        lambda module, a, kw: calls.append(tensors_of(a, kw)), with_kwargs=True
    )
    original = family.noisy_latents_and_target

    def spy(x0, noise, timesteps):
        draws.append((noise.clone(), timesteps.clone()))
        return original(x0, noise, timesteps)

    family.noisy_latents_and_target = spy
    try:
        trainer.train()
    finally:
        handle.remove()

    assert len(calls) == 2 * args.max_steps  # one policy and one reference forward per step
    n = args.per_device_train_batch_size
    for step in range(args.max_steps):
        policy, reference = calls[2 * step], calls[2 * step + 1]
        assert len(policy) == len(reference) >= 3
        assert all(torch.equal(p, r) for p, r in zip(policy, reference))
        noise, timesteps = draws[step]
        assert noise.shape[0] == timesteps.shape[0] == 2 * n
        assert torch.equal(noise[:n], noise[n:]) and torch.equal(timesteps[:n], timesteps[n:])


@pytest.mark.parametrize("name", NAMES)
def test_full_finetune_saves_a_reloadable_transformer(tmp_path, name, paths, pairs):
    args = make_args(tmp_path, max_steps=1)
    trainer = DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=pairs)
    before = {k: v.clone() for k, v in trainer.family.denoiser.state_dict().items()}
    trainer.train()
    # Policy == frozen copy at step 1. Not bit-exact: on CPU a convolution whose weight requires grad takes another
    # kernel (Sana's depthwise convs differ by ~4e-7), which beta 500 turns into ~1e-5 of loss.
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-4)
    trainer.save_model()
    trained = trainer.family.denoiser.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the transformer did not train"
    reloaded = type(trainer.family.denoiser).from_pretrained(args.output_dir, subfolder="transformer")
    assert reloaded.state_dict().keys() == trained.keys()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trained[key])
    pipe = DiffusionPipeline.from_pretrained(paths[name], transformer=reloaded)
    assert np.isfinite(render(pipe, name)).all()


@pytest.mark.parametrize("name", NAMES)
def test_cached_latents_and_embeddings_give_the_uncached_losses(tmp_path, name, paths, varied_pairs):
    runs = {}
    for cached in (False, True):
        args = make_args(tmp_path / str(cached), max_steps=3, precompute_latents=cached,
                         precompute_text_embeddings=cached)
        trainer = DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=varied_pairs)
        if cached:
            assert all(next(m.parameters()).device.type == "cpu" for m in trainer.family.frozen_modules)
            forbid(trainer.family.vae, "the VAE")
            for encoder in trainer.family.text_encoders:
                forbid(encoder, "the text encoder")
        trainer.train()
        runs[cached] = losses_of(trainer)
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert len(set(np.round(runs[False], 4))) > 1  # the model did train


# ----- the denoiser call is the pipeline's -------------------------------------------------------------------------
def pipeline_first_step(pipe, name, latents):
    """Run the pipeline one step from `latents` (its own layout); return the latents after it and its first
    timestep and sigmas."""
    after = {}

    def callback(pipeline, step, timestep, kwargs):
        after.setdefault("latents", kwargs["latents"].clone())
        return {}

    pipe("a red cat on a square", num_inference_steps=4, height=32, width=32, latents=latents, output_type="latent",
         callback_on_step_end=callback, **PLAIN_SAMPLING[name])
    return after["latents"], pipe.scheduler.timesteps[0], pipe.scheduler.sigmas[:2]


@pytest.mark.parametrize("name", NAMES)
def test_the_family_prediction_drives_the_pipelines_own_sampler(name, paths):
    """One pipeline step from x equals x + (s1 - s0) * family.predict(x, t0): prompt encoding (Sana's instruction,
    Qwen's template and mask, Z-Image's chat markup), packing, time scaling and the sign of the prediction all match
    what the pipeline does when a user samples."""
    family = load_family(paths[name], args=make_args(Path("unused")))
    pipe = family.pipeline
    generator = torch.Generator().manual_seed(1)
    channels, height, width = family.latent_shape(32)
    x = torch.randn(1, channels, height, width, generator=generator)
    packed = type(pipe)._pack_latents(x, 1, channels, *x.shape[2:]) if name == "qwenimage" else x
    stepped, t0, (s0, s1) = pipeline_first_step(pipe, name, packed)
    if name == "qwenimage":
        stepped = type(pipe)._unpack_latents(stepped, 32, 32, family.vae_scale_factor).squeeze(2)
    with torch.no_grad():
        velocity = family.predict(family.denoiser, x, t0.reshape(1), family.encode_prompt(["a red cat on a square"],
                                                                                          torch.device("cpu")))
    torch.testing.assert_close(stepped, x + (s1 - s0) * velocity, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwenimage", "zimage"])
def test_padding_of_longer_prompts_in_the_batch_changes_nothing(name, paths):
    family = load_family(paths[name], args=make_args(Path("unused")))
    cpu = torch.device("cpu")
    short, long = "a red cat", "a photo of a blue dog with a plain white background in a picture of a square"
    torch.manual_seed(0)
    x, t = torch.randn(2, *family.latent_shape(32)), family.sample_timesteps(2, cpu)
    with torch.no_grad():
        together = family.predict(family.denoiser, x, t, family.encode_prompt([short, long], cpu))
        alone = family.predict(family.denoiser, x[:1], t[:1], family.encode_prompt([short], cpu))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-4)


# ----- schedules, latents, bad input -------------------------------------------------------------------------------
# The noise level s the transformer is told, from the time input it receives.
TRANSFORMER_SIGMA = {
    "qwenimage": lambda a, kw: kw["timestep"],  # t / 1000
    "zimage": lambda a, kw: 1.0 - a[1],  # 1 - t / 1000
    "sana": lambda a, kw: kw["timestep"] / 1000,
}
# Qwen-Image shifts by image size at inference only (unshifted training sigmas, as diffusers' script); Z-Image's
# static shift 3 and Sana's flow_shift 3 (from its DPM-Solver config) are the training distribution too.
PUBLISHED_SHIFT = {"qwenimage": 1.0, "zimage": 3.0, "sana": 3.0}


@pytest.mark.parametrize("name", NAMES)
def test_the_published_shift_reaches_the_transformer(tmp_path, name, paths, pairs):
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=4)
    trainer = DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=pairs, peft_config=family_lora())
    family, told, used = trainer.family, [], []
    handle = family.denoiser.register_forward_pre_hook(
        lambda module, a, kw: told.append(TRANSFORMER_SIGMA[name](a, kw).detach().clone()), with_kwargs=True
    )
    original = family.noisy_latents_and_target
    family.noisy_latents_and_target = lambda x0, noise, t: (used.append(family.sigmas_for(t)), original(x0, noise, t))[1]
    try:
        trainer.train()
    finally:
        handle.remove()
    told = torch.cat(told[::2])  # policy calls
    # The transformer is told the noise level the latents were noised with ...
    torch.testing.assert_close(told.float(), torch.cat(used).float(), atol=1e-6, rtol=0)
    # ... which is the shifted grid s = shift * b / (1 + (shift - 1) * b), b = k / 1000.
    shift = PUBLISHED_SHIFT[name]
    grid = told.double() / (shift - (shift - 1) * told.double())
    torch.testing.assert_close(grid * 1000, (grid * 1000).round(), atol=1e-3, rtol=0)
    if shift != 1.0:  # and not the unshifted grid
        assert not torch.allclose(told.double() * 1000, (told.double() * 1000).round(), atol=1e-3, rtol=0)


def test_qwen_image_latents_are_normalised_per_channel(paths):
    """(z - latents_mean) / latents_std per channel, with the tiny VAE's values (mean .1 -.2 .3 0, std 1.5 .8 1.2 2)."""
    family = load_family(paths["qwenimage"], args=make_args(Path("unused")))
    scaled = family.scale_latents(torch.ones(1, 4, 2, 2))
    expected = torch.tensor([0.9 / 1.5, 1.2 / 0.8, 0.7 / 1.2, 1.0 / 2.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    torch.testing.assert_close(scaled, expected)
    mean, std = family.encode_pixels(torch.zeros(2, 3, 32, 32))
    assert mean.shape == std.shape == (2, 4, 8, 8)  # one-frame clips come back as images


@pytest.mark.parametrize("name, bad, multiple", [("qwenimage", 36, 8), ("zimage", 34, 4), ("sana", 33, 2)])
def test_a_resolution_the_patches_cannot_take_names_the_multiple(tmp_path, name, bad, multiple, paths, pairs):
    pipeline_class = FAMILY[name].pipeline_class_names[0]
    with pytest.raises(ValueError, match=rf"resolution={bad} must be a multiple of {multiple} for {pipeline_class}"):
        DiffusionDPOTrainer(model=paths[name], args=make_args(tmp_path, resolution=bad), train_dataset=pairs)
