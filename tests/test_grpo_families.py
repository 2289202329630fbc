"""GRPO and DiffusionNFT on every family of the registry that can sample, beyond SD1.x (epsilon) and SD3 (tested in
test_grpo.py and test_nft.py): SDXL and SD v-prediction through DDIM with eta, and FLUX.1 (with and without its
guidance embedding), FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Sana and Wan through Flow-SDE, on their tiny
pipelines. Each family has its own latent layout (packed tokens, frames), timestep scale and conditioning: the rollout
records them in the pipeline's terms and the training forward must see exactly the same inputs."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from helpers import DenoiserRecorder, assert_grpo_training_repeats_rollout, lora, make_args

from diffusion_dpo_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer, DiffusionNFTConfig, DiffusionNFTTrainer
from diffusion_dpo_trainer.families import load_family
from diffusion_dpo_trainer.rollout import guidance_conditioning, rollout
from diffusion_dpo_trainer.testing import TINY_BUILDERS, make_flux_pipeline, make_sd_pipeline

PROMPTS = ["a red square", "a blue circle"]
# name -> (pipeline class, builder keyword arguments, the guidance scale that trains without an unconditional branch)
CASES = {
    "sdxl": ("StableDiffusionXLPipeline", {}, 1.0),
    "sd-v": ("StableDiffusionPipeline", {"prediction_type": "v_prediction"}, 1.0),
    "flux": ("FluxPipeline", {}, 1.0),
    "flux-dev": ("FluxPipeline", {"guidance_embeds": True}, 3.5),  # FLUX.1-dev: the guidance embedding, not CFG
    "flux2": ("Flux2Pipeline", {}, 4.0),  # FLUX.2 [dev]: the guidance embedding
    "flux2-klein": ("Flux2KleinPipeline", {}, 1.0),
    "qwenimage": ("QwenImagePipeline", {}, 1.0),
    "zimage": ("ZImagePipeline", {}, 0.0),  # Z-Image guides at any scale > 0
    "sana": ("SanaPipeline", {}, 1.0),
    "wan": ("WanPipeline", {}, 1.0),
}
#: Families whose pipeline's classifier-free guidance GRPO trains with, checked at guidance 2 as well.
GUIDED = ["sdxl", "sana", "wan", "flux2-klein", "zimage"]
NUM_FRAMES = 5  # Wan: 4k + 1 frames, 2 latent frames
#: Sampling steps: 2, or 3 where 2 would hide a difference (Z-Image's 1 - t/1000 and (1000 - t)/1000 agree at 750).
STEPS = {"zimage": 3}


def brightness(prompts, completions, **kwargs):
    """Mean grey level of each image, or of each video's frames (Wan)."""
    def grey(item):
        frames = item if isinstance(item, list) else [item]
        return float(np.mean([np.asarray(frame.convert("L"), dtype=np.float64) for frame in frames]))
    return [grey(item) for item in completions]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Each case's tiny pipeline, built on first use and kept for the module."""
    built = {}

    def path(name):
        if name not in built:
            pipeline_class, kwargs, _ = CASES[name]
            builder = {"StableDiffusionPipeline": make_sd_pipeline, "FluxPipeline": make_flux_pipeline}.get(
                pipeline_class, TINY_BUILDERS[pipeline_class])
            built[name] = builder(tmp_path_factory.mktemp(name) / "pipe", **kwargs)
        return built[name]

    return path


def common_args(tmp_path, name):
    return {"output_dir": str(tmp_path / "out"), "resolution": 32, "per_device_train_batch_size": 2, "max_steps": 1,
            "learning_rate": 1e-2, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
            "dataloader_pin_memory": False, "num_generations": 2, "num_inference_steps": STEPS.get(name, 2),
            "disable_tqdm": True,
            "guidance_scale": CASES[name][2], **({"num_frames": NUM_FRAMES} if name == "wan" else {})}


def grpo_trainer(path, tmp_path, name, **overrides):
    args = DiffusionGRPOConfig(**{**common_args(tmp_path, name), "beta": 0.04, "timestep_fraction": 1.0, **overrides})
    return DiffusionGRPOTrainer(model=path, reward_funcs=brightness, args=args,
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=lora())


def lora_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora" in k}


@pytest.mark.parametrize(("name", "guidance"), [pytest.param(name, case[2], id=name) for name, case in CASES.items()]
                         + [pytest.param(name, 2.0, id=f"{name}-cfg") for name in GUIDED])
def test_grpo_rollout_is_the_pipelines_sampler_and_training_recomputes_it_exactly(name, guidance, paths, tmp_path):
    """Per family, without classifier-free guidance and with it (GUIDED, at 2: the pipeline's own negative and branch
    combination): (1) the rollout's sampler step at noise level 0 is the pipeline's own deterministic sampler, bit
    for bit (DDIM for the SD families; flow Euler for the others, which replaces Sana's DPM-Solver and Wan's UniPC),
    at the configured size in the training layout; (2) every denoiser input of a trained step (latents mapped from
    the pipeline's layout and back, timestep in the denoiser's scale, conditioning, guidance embedding, position ids)
    is the rollout's, for the policy and the reference, so the recomputed log-density is the recorded one (importance
    ratio exactly 1, KL to the adapter-off reference exactly 0 on fresh samples); (3) one optimizer step moves the
    adapter."""
    trainer = grpo_trainer(paths(name), tmp_path, name, guidance_scale=guidance)
    family = trainer.family
    if trainer.dynamics == "flow_sde":
        assert isinstance(family.pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    sampling_steps = STEPS.get(name, 2)
    call = {"num_inference_steps": sampling_steps, "guidance_scale": guidance}
    seeds = [1, 2]
    plain = rollout(family, PROMPTS, seeds, 32, decode=False, **call)
    noise_level, trainer.noise_level = trainer.noise_level, 0.0
    silent = rollout(family, PROMPTS, seeds, 32, decode=False, step=trainer._sampler_step(None), record=True, **call)
    trainer.noise_level = noise_level
    assert torch.equal(silent.latents, plain.latents)
    # Sampled at the configured size (and clip length), in the training layout: Sana's binning and Wan's 81 frames off.
    pixels = (3, NUM_FRAMES, 32, 32) if name == "wan" else (3, 32, 32)
    assert plain.latents.shape == family.scale_latents(torch.zeros(2, *family.latent_shape(pixels))).shape
    noisy = rollout(family, PROMPTS, seeds, 32, decode=False, step=trainer._sampler_step(None), **call)
    assert not torch.allclose(noisy.latents, plain.latents, atol=1e-3)

    before = lora_state(trainer)
    with DenoiserRecorder(trainer) as recorder:
        trainer.train()
    steps = trainer.trained_steps(0)
    assert_grpo_training_repeats_rollout(recorder, sampling_steps, steps)
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert [log[f"importance_ratio/step_{j}"] for j in steps] == [1.0] * len(steps)
    assert log["kl"] == 0.0
    after = lora_state(trainer)
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "the optimizer step changed nothing"


# FLUX.2 [klein] left out: its pipeline rounds t to the latents' dtype, bf16 in a pipeline loaded in bf16 (grpo.md).
@pytest.mark.parametrize("name", ["sdxl", "sana", "wan", "zimage"])
def test_guided_prediction_is_the_model_output_the_pipeline_steps_with_in_bf16(name, paths, tmp_path):
    """In a bf16 pipeline, where the dtype of the branch combination shows (Sana and Z-Image combine in float32, the
    others in the denoiser output's dtype): `family.guided_prediction` on a recorded step's latents, timestep and the
    family's conditioning and negative is the model output the pipeline handed its scheduler, bit for bit."""
    pipeline = DiffusionPipeline.from_pretrained(paths(name), torch_dtype=torch.bfloat16)
    if name == "sdxl":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)  # no input scaling, as GRPO samples
    family = load_family(pipeline, make_args(tmp_path, num_frames=NUM_FRAMES))
    result = rollout(family, PROMPTS, [1, 2], 32, decode=False, record=True, num_inference_steps=2, guidance_scale=2.0)
    conditioning = family.encode_prompt(PROMPTS, torch.device("cpu"))
    negative = guidance_conditioning(family, conditioning, lambda texts: family.encode_prompt(texts, "cpu"), 2.0)
    extra = family.time_conditioning(family.generated_conditioning(len(PROMPTS), 32), 32, torch.device("cpu"))
    latents = family.sampled_latents(result.trajectory["latents"][:, 1], 32).to(torch.bfloat16)
    with torch.no_grad():
        output = family.guided_prediction(family.denoiser, latents, result.trajectory["timesteps"][:, 1],
                                          {**conditioning, **extra}, {**negative, **extra}, 2.0)
    expected = result.trajectory["model_output"][:, 1]
    assert expected.dtype == (torch.float32 if name in ("sana", "zimage") else torch.bfloat16)
    assert torch.equal(family.pipeline_latents(output), expected)


# name -> a guidance scale that pipeline ignores, and the reason given
REFUSED = {
    "flux": (2.0, "does nothing in FluxPipeline's sampling"),
    "qwenimage": (2.0, "does nothing in QwenImagePipeline's sampling"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_guidance_scale_the_pipeline_ignores_is_refused_with_its_reason(name, paths, tmp_path):
    """A guidance scale that does nothing in the pipeline's sampling (no classifier-free guidance through
    `guidance_scale`, no guidance embedding) is refused rather than silently ignored; the guidance each family trains
    with (CASES, GUIDED) is accepted (the test above)."""
    scale, reason = REFUSED[name]
    with pytest.raises(ValueError, match=reason):
        grpo_trainer(paths(name), tmp_path, name, guidance_scale=scale)


# One case per latent layout and conditioning (FLUX.1-dev, FLUX.2 [klein] and SD v-prediction add none for NFT).
@pytest.mark.parametrize("name", ["sdxl", "flux", "flux2", "qwenimage", "zimage", "sana", "wan"])
def test_diffusion_nft_trains_a_step_on_every_family(name, paths, tmp_path):
    """DiffusionNFT re-noises the rollout's clean latents (in the training layout: FLUX.2's and Qwen-Image's packed
    tokens unpacked) at the rollout's timesteps mapped to the training schedule (Sana's DPM-Solver and Wan's UniPC
    timesteps included), with the family's per-image conditioning (SDXL's time ids), and trains on the three
    predictions' clean estimates: one optimizer step is finite and moves the adapter on every family."""
    args = DiffusionNFTConfig(**{**common_args(tmp_path, name), "timestep_fraction": 0.5})  # one timestep per image
    trainer = DiffusionNFTTrainer(model=paths(name), reward_funcs=brightness, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=lora())
    before = lora_state(trainer)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert np.isfinite(log["loss"]) and log["loss"] != 0
    after = {k: v for k, v in lora_state(trainer).items() if ".default." in k}
    assert any(not torch.equal(value, before[k]) for k, value in after.items()), "the optimizer step changed nothing"


@pytest.mark.parametrize("dynamics", ["dance", "cps"])
def test_dance_and_cps_steps_recompute_exactly_on_packed_latents(dynamics, paths, tmp_path):
    """DanceGRPO's and CPS's steps run in the pipeline's packed layout too: the first ratio is exactly 1 (FLUX.1)."""
    trainer = grpo_trainer(paths("flux"), tmp_path, "flux", dynamics=dynamics)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    steps = trainer.trained_steps(0)
    assert steps == ([0] if dynamics == "cps" else [0, 1])  # CPS's last step (to sigma 0) is deterministic
    assert [log[f"importance_ratio/step_{j}"] for j in steps] == [1.0] * len(steps)


def test_the_first_ratio_is_exactly_one_under_bf16(paths, tmp_path):
    """bf16 autocast over a bf16 base (the adapter in float32): rollout and training run the same mixed-precision
    forward, so the recomputed density is still the recorded one (FLUX.1: packed latents, t / 1000)."""
    trainer = grpo_trainer(paths("flux"), tmp_path, "flux", bf16=True, use_cpu=True, beta=0.0)
    assert trainer.family.denoiser.dtype == torch.bfloat16
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert [log[f"importance_ratio/step_{j}"] for j in trainer.trained_steps(0)] == [1.0, 1.0]
