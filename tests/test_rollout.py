"""rollout.py on tiny pipelines: the default step is the pipeline's own sampling, a pluggable step function with noise
level 0 reproduces it, a recorded trajectory chains its steps, and `decode=False` skips only the decode."""

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from diffusion_dpo_trainer import sde
from diffusion_dpo_trainer.families import load_family
from diffusion_dpo_trainer.rollout import DDIMStep, FunctionStep, SchedulerStep, rollout, rollout_seeds
from diffusion_dpo_trainer.sampling import iter_sample_batches

PROMPTS = ["a red square", "a red square", "a blue circle", "a blue circle"]
CALL = {"num_inference_steps": 3, "guidance_scale": 2.0}


def euler_sde_step(latents, model_output, sigma, sigma_next, noise_level, generator=None):
    """A flow-matching SDE step in sde.py's form, transcribed here: mean = the Euler step; noise scaled by
    noise_level (0 here: deterministic, log-probability not defined)."""
    mean = latents + (sigma_next - sigma) * model_output
    std = noise_level * (sigma - sigma_next).abs().sqrt()
    noise = torch.randn(latents.shape, generator=generator) if noise_level else torch.zeros_like(latents)
    return mean + std * noise, None, mean, std


@pytest.fixture(scope="module")
def sd3(sd3_path):
    return load_family(DiffusionPipeline.from_pretrained(sd3_path))


def test_seeds_depend_on_the_key_and_the_global_place():
    seeds = rollout_seeds(0, (0, 5, 1), first=2, num_prompts=2, n=3)
    assert len(set(seeds)) == 6
    assert seeds[3:] == rollout_seeds(0, (0, 5, 1), first=3, num_prompts=1, n=3)  # prompt 1 here = prompt 3 globally
    assert rollout_seeds(0, (0, 6, 1), 2, 2, 3) != seeds


def test_default_step_is_the_pipelines_own_sampling(sd3):
    seeds = [3, 4, 5, 6]
    result = rollout(sd3, PROMPTS, seeds, 32, batch_size=3, **CALL)
    expected = [latents for _, latents in iter_sample_batches(sd3.pipeline, PROMPTS, seeds, 3, progress=False,
                                                              return_latents=True, height=32, width=32, **CALL)]
    assert torch.equal(result.latents, torch.cat(expected).float())
    assert len(result.images) == 4 and result.trajectory is None
    assert "step" not in vars(sd3.pipeline.scheduler)  # the pipeline is left as it was


def test_a_step_function_with_noise_level_0_reproduces_the_pipeline_and_records_the_trajectory(sd3):
    seeds = [3, 4, 5, 6]
    plain = rollout(sd3, PROMPTS, seeds, 32, **CALL)
    stepped = rollout(sd3, PROMPTS, seeds, 32, batch_size=2, step=FunctionStep(euler_sde_step, 0.0), record=True,
                      decode=False, **CALL)
    torch.testing.assert_close(stepped.latents, plain.latents, rtol=1e-5, atol=1e-6)
    assert stepped.images is None
    trajectory = stepped.trajectory
    steps = CALL["num_inference_steps"]
    assert trajectory["latents"].shape == (4, steps, *plain.latents.shape[1:])
    assert trajectory["timesteps"].shape == (4, steps) and trajectory["sigma"].shape == (4, steps)
    assert torch.equal(trajectory["latents"][:, 1:], trajectory["next_latents"][:, :-1])  # the steps chain
    assert torch.equal(trajectory["next_latents"][:, -1], stepped.latents)
    # Each recorded step is the step function applied to what the step saw.
    prev, _, _, _ = euler_sde_step(trajectory["latents"][:, 1], trajectory["model_output"][:, 1],
                                   trajectory["sigma"][0, 1], trajectory["sigma_next"][0, 1], 0.0)
    torch.testing.assert_close(prev, trajectory["next_latents"][:, 1])
    assert (trajectory["sigma"][:, 1:] == trajectory["sigma_next"][:, :-1]).all()


def test_a_flow_steps_noise_comes_from_each_images_own_seed(sd3):
    """The flow pipelines pass their scheduler's step no generator; the rollout hands a stochastic step each image's
    own, so its noise depends on that image's seed alone: not on the global RNG (which sampling restores after every
    call, so every rollout drew the same noise) nor on the other images of the batch (N processes sample what one
    does)."""
    step, call = FunctionStep(sde.flow_sde_step, 0.7), {"decode": False, "record": True, **CALL}
    torch.manual_seed(0)
    both = rollout(sd3, PROMPTS[1:3], [3, 4], 32, step=step, **call)
    torch.manual_seed(1)
    assert torch.equal(rollout(sd3, PROMPTS[1:3], [3, 4], 32, step=step, **call).latents, both.latents)
    alone = rollout(sd3, PROMPTS[2:3], [4], 32, step=step, **call)  # up to the batch size's float rounding
    torch.testing.assert_close(alone.trajectory["next_latents"], both.trajectory["next_latents"][1:], rtol=0, atol=1e-4)
    assert "prepare_latents" not in vars(sd3.pipeline)  # the pipeline is left as it was


def test_a_ddim_step_reused_at_another_step_count_steps_as_a_new_one(sd_path):
    """DDIMStep keeps each schedule's step indices and alphas between steps: a new schedule (another step count) is
    looked up afresh, never in the last one's table."""
    family = load_family(DiffusionPipeline.from_pretrained(sd_path))
    family.pipeline.scheduler = DDIMScheduler.from_config(family.pipeline.scheduler.config)
    reused = DDIMStep(1.0, stochastic=[0])
    for steps in (2, 3):
        call = {"num_inference_steps": steps, "guidance_scale": 1.0, "decode": False, "record": True}
        again = rollout(family, PROMPTS[:2], [1, 2], 32, step=reused, **call).trajectory
        new = rollout(family, PROMPTS[:2], [1, 2], 32, step=DDIMStep(1.0, stochastic=[0]), **call).trajectory
        for name in ("next_latents", "alpha", "alpha_prev"):
            assert torch.equal(again[name], new[name])
        assert not again["log_prob"][:, 0].isnan().any() and again["log_prob"][:, 1:].isnan().all()


def test_recording_the_schedulers_own_step_changes_nothing(sd_path):
    family = load_family(DiffusionPipeline.from_pretrained(sd_path))
    plain = rollout(family, PROMPTS[:2], [1, 2], 32, num_inference_steps=2, guidance_scale=1.0)
    recorded = rollout(family, PROMPTS[:2], [1, 2], 32, step=SchedulerStep(), record=True, num_inference_steps=2,
                       guidance_scale=1.0)
    assert torch.equal(recorded.latents, plain.latents)
    assert torch.equal(recorded.trajectory["next_latents"][:, -1], plain.latents)
    with pytest.raises(ValueError, match="no `sigmas` table"):
        rollout(family, PROMPTS[:1], [1], 32, step=FunctionStep(euler_sde_step), num_inference_steps=2)


def test_generated_images_get_the_familys_own_conditioning(sdxl_path, sd_path):
    """SDXL's micro-conditioning of a generated image (its own size, no crop) comes from the family, in the batch keys
    its time_conditioning reads; SD has none."""
    sdxl = load_family(DiffusionPipeline.from_pretrained(sdxl_path))
    batch = {f"{side}_{key}": value for side in ("chosen", "rejected")
             for key, value in sdxl.generated_conditioning(2, 32).items()}
    time_ids = sdxl.time_conditioning(batch, 32, torch.device("cpu"))["time_ids"]
    assert time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 4
    assert load_family(DiffusionPipeline.from_pretrained(sd_path)).generated_conditioning(2, 32) == {}
