"""Facts of the Qwen-Image, Z-Image and Sana families on tiny offline pipelines: the family's prediction drives each
pipeline's own sampler, prompt padding and masks change nothing, the published shift reaches the transformer, Qwen-Image's
per-channel latent normalisation.

What every family must do (LoRA, reference inputs, saving, caching, the resolution check) is in
test_family_conformance.py."""

from pathlib import Path

import pytest
import torch
from helpers import assert_cached_run_matches_uncached, lora, make_args

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.families import load_family
from diffusion_dpo_trainer.testing import make_preference_dataset
from diffusion_dpo_trainer.testing.qwenimage import make_qwenimage_pipeline
from diffusion_dpo_trainer.testing.sana import make_sana_pipeline
from diffusion_dpo_trainer.testing.zimage import make_zimage_pipeline

BUILDERS = {"qwenimage": make_qwenimage_pipeline, "zimage": make_zimage_pipeline, "sana": make_sana_pipeline}
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


# ----- prompt padding and masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwenimage", "zimage"])
def test_cached_runs_match_uncached_with_prompts_of_different_lengths(tmp_path, name, paths, varied_pairs):
    """The cache stores each prompt padded to one length with its mask: with prompts of different lengths in a batch
    (the suite's data has equal lengths), a cached run still logs the uncached losses."""

    def make_trainer(cached):
        args = make_args(tmp_path / str(cached), max_steps=3, precompute_latents=cached,
                         precompute_text_embeddings=cached)
        return DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=varied_pairs,
                                   eval_dataset=varied_pairs.select(range(2)))

    assert_cached_run_matches_uncached(make_trainer, "chosen")


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
    channels, height, width = family.latent_shape((3, 32, 32))
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
    x, t = torch.randn(2, *family.latent_shape((3, 32, 32))), family.sample_timesteps(2, cpu)
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
    trainer = DiffusionDPOTrainer(model=paths[name], args=args, train_dataset=pairs, peft_config=lora(target_modules=None))
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
