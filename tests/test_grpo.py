"""DiffusionGRPOTrainer on the tiny SD3 (Flow-SDE) and SD1.x (DDIM with eta) pipelines: the rollout is the pipeline's
sampler, training recomputes exactly what the rollout saw, the wiring of the loss, resume, two processes, errors."""


import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import (
    DenoiserRecorder,
    assert_grpo_training_repeats_rollout,
    lora,
    on_policy_reports,
    recording_text_encoding,
)

import diffusion_dpo_trainer.grpo_trainer as grpo_module
from diffusion_dpo_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_dpo_trainer.rollout import group_noise_seeds, rollout, rollout_seeds

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun"]


def brightness(prompts, completions, **kwargs):
    """TRL's convention: keyword arguments, one float per completion (here, an image)."""
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def grpo_args(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "resolution": 32, "per_device_train_batch_size": 2, "max_steps": 1,
              "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
              "dataloader_pin_memory": False, "num_generations": 2, "num_inference_steps": 3, "guidance_scale": 2.0,
              "disable_tqdm": True, "beta": 0.04, "timestep_fraction": 1.0}
    values.update(overrides)
    return DiffusionGRPOConfig(**values)


def grpo_trainer(path, tmp_path, reward_funcs=brightness, **overrides):
    return DiffusionGRPOTrainer(model=path, reward_funcs=reward_funcs, args=grpo_args(tmp_path, **overrides),
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=lora())


def logged(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def lora_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora" in k}


@pytest.mark.parametrize("name", ["sd3", "sd"])
def test_noise_level_0_reproduces_the_pipelines_own_sampler(name, sd3_path, sd_path, tmp_path):
    """Through the trainer's own sampler step: noise level 0 is the pipeline's deterministic sampler bit for bit
    (SD3's flow Euler, SD's DDIM with eta 0), and the trainer's noise level does change the samples."""
    trainer = grpo_trainer(sd3_path if name == "sd3" else sd_path, tmp_path)
    call = {"num_inference_steps": 3, "guidance_scale": 2.0}
    seeds = [1, 2, 3, 4]
    plain = rollout(trainer.family, PROMPTS, seeds, 32, decode=False, **call)
    noisy = rollout(trainer.family, PROMPTS, seeds, 32, decode=False, step=trainer._sampler_step(None), **call)
    trainer.noise_level = 0.0
    silent = rollout(trainer.family, PROMPTS, seeds, 32, decode=False, step=trainer._sampler_step(None), record=True,
                     **call)
    assert torch.equal(silent.latents, plain.latents)
    assert not torch.allclose(noisy.latents, plain.latents, atol=1e-3)


@pytest.mark.parametrize("name", ["sd3", "sd"])
def test_training_recomputes_exactly_what_the_rollout_saw_and_the_first_ratio_is_one(name, sd3_path, sd_path,
                                                                                      tmp_path):
    """Every denoiser input of a trained step (latents, timestep, prompt and unconditional embeddings, in the
    pipeline's [unconditional; conditional] batch) is the rollout's, for the policy and the reference; so the
    importance ratio of every trained step is exactly 1 on fresh samples."""
    trainer = grpo_trainer(sd3_path if name == "sd3" else sd_path, tmp_path)
    steps = trainer.trained_steps(0)
    assert steps == ([0, 1, 2] if name == "sd3" else [0, 1])  # DDIM's last step (to alpha 1) is deterministic
    with DenoiserRecorder(trainer) as recorder:
        trainer.train()
    assert_grpo_training_repeats_rollout(recorder, 3, steps)
    (log,) = logged(trainer)
    assert log["importance_ratio/mean"] == 1.0
    assert [log[f"importance_ratio/step_{j}"] for j in steps] == [1.0] * len(steps)


def test_max_prompt_length_and_the_text_cache_reach_the_rollout(sd3_path, tmp_path):
    """With cached, truncated prompt embeddings and the text encoders released, the rollout samples with the cache's
    tensors (prompts and the "" of guidance) and the training forward sees exactly them: the first ratio is 1."""
    trainer = grpo_trainer(sd3_path, tmp_path, max_prompt_length=8, precompute_text_embeddings=True,
                           release_cached_encoders=True)
    assert trainer.family.text_encoders == [] and len(trainer.data_collator.prompt_embeddings) == len(PROMPTS) + 1
    clip_tokens = trainer.pipeline.tokenizer.model_max_length
    with DenoiserRecorder(trainer) as recorder:
        trainer.train()
    assert {call["encoder_hidden_states"].shape[1] for call in recorder.calls} == {clip_tokens + 8}
    assert logged(trainer)[0]["importance_ratio/mean"] == 1.0


def test_logged_loss_is_the_clipped_policy_loss_plus_beta_times_kl(sd3_path, tmp_path):
    """On a reused rollout the ratio moves away from 1: the loss the trainer optimises is the mean over trained steps
    of the clipped policy loss plus beta * KL, with clipping counted at the configured epsilon."""
    trainer = grpo_trainer(sd3_path, tmp_path, max_steps=2, num_iterations=2, beta=0.5, learning_rate=3e-2,
                           epsilon=1e-6)
    trainer.train()
    first, second = logged(trainer)
    assert first["kl"] == 0.0 and first["clipfrac"] == 0.0  # the adapter starts as a no-op: policy == reference
    assert second["importance_ratio/mean"] != 1.0 and second["kl"] > 0
    assert second["clipfrac"] > 0
    assert second["loss"] == pytest.approx(second["policy_loss"] + 0.5 * second["kl"], rel=1e-4, abs=1e-9)


def test_samples_come_from_the_policy_being_trained(sd3_path, tmp_path, monkeypatch):
    """Each rollout is the current policy's: re-sampling its seeds through the pipeline (adapter on) gives the same
    latents, and the base model (adapter off) other latents once the adapter has trained."""
    trainer = grpo_trainer(sd3_path, tmp_path, max_steps=3, learning_rate=3e-2)
    checks = []

    def checked(family, prompts, seeds, resolution, batch_size=None, **kwargs):
        result = rollout(family, prompts, seeds, resolution, batch_size, **kwargs)
        again = rollout(family, prompts, seeds, resolution, batch_size, **kwargs)
        with family.reference_pipeline():
            base = rollout(family, prompts, seeds, resolution, batch_size, **kwargs)
        checks.append((trainer.state.global_step, torch.equal(again.latents, result.latents),
                       (base.latents - result.latents).abs().max().item()))
        return result

    monkeypatch.setattr(grpo_module, "rollout", checked)
    trainer.train()
    assert [step for step, _, _ in checks] == [0, 1, 2]
    assert all(same for _, same, _ in checks)
    assert checks[0][2] == 0 and checks[1][2] > 0 and checks[2][2] > 0


def test_sliding_window_and_trained_steps(sd3_path, tmp_path):
    """MixGRPO's window: only its steps are stochastic (the others the deterministic sampler, no density) and
    trained; a sliding window moves every `sde_window_shift_every` steps and rolls back."""
    trainer = grpo_trainer(sd3_path, tmp_path, num_inference_steps=6, sde_window_size=2, sde_window_mode="sliding",
                           sde_window_shift_every=2)
    assert [trainer.sde_window(s)[0] for s in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
    assert trainer.trained_steps(4) == [2, 3]
    call = {"num_inference_steps": 6, "guidance_scale": 2.0}
    windowed = rollout(trainer.family, PROMPTS[:2], [1, 2], 32, step=trainer._sampler_step([2, 3]), record=True,
                       decode=False, **call)
    log_prob = windowed.trajectory["log_prob"]
    assert log_prob[:, [2, 3]].isfinite().all() and log_prob[:, [0, 1, 4, 5]].isnan().all()
    plain = rollout(trainer.family, PROMPTS[:2], [1, 2], 32, record=True, decode=False, **call)
    assert torch.equal(windowed.trajectory["next_latents"][:, :2], plain.trajectory["next_latents"][:, :2])
    no_window = grpo_trainer(sd3_path, tmp_path, num_inference_steps=10, timestep_fraction=0.99)
    assert no_window.trained_steps(0) == list(range(9))  # flow_grpo: 9 of 10, never the sharp last step


def test_a_rollout_encodes_its_prompts_once_for_sampling_and_every_step_that_trains_on_it(sd_path, tmp_path):
    """Without a text cache, the text encoder runs in the rollout only (the prompts, then guidance's ""): the trained
    steps and the optimizer step that reuses the rollout read its conditioning from the batch, which keeps one row
    per prompt, not per image; the family's per-image conditioning is built once per micro-step, not per forward."""
    trainer = grpo_trainer(sd_path, tmp_path, max_steps=2, num_iterations=2)
    timed = []
    time_conditioning = trainer.family.time_conditioning

    def counted(*args, **kwargs):
        timed.append(trainer.state.global_step)
        return time_conditioning(*args, **kwargs)

    trainer.family.time_conditioning = counted
    try:
        with recording_text_encoding(trainer) as (encoded, _):
            trainer.train()
    finally:
        del trainer.family.time_conditioning
    assert encoded == [0, 0]  # step 0's rollout: the prompts and the negative; step 1 reuses it
    assert timed == [0, 1]  # once per micro-step, for the 2 trained steps' policy and reference forwards
    batch = trainer._buffer.batches[0]
    assert len(batch["prompt"]) == 4 and len(batch["conditioning/encoder_hidden_states"]) == 2
    assert len(batch["negative/encoder_hidden_states"]) == 2
    assert logged(trainer)[0]["importance_ratio/mean"] == 1.0


def test_group_noise_seeds_depend_on_the_global_group_only():
    """One initial-noise seed per group, shared by its images, from the group's place in the global batch: two
    processes (each its half of the groups) draw what one process draws, and no group's stream is one of its images'
    own (their step noise)."""
    key = (0, 3, 1)
    seeds = group_noise_seeds(7, key, 0, 4, 3)
    assert seeds == group_noise_seeds(7, key, 0, 2, 3) + group_noise_seeds(7, key, 2, 2, 3)
    groups = [seeds[g * 3 : g * 3 + 3] for g in range(4)]
    assert all(len(set(group)) == 1 for group in groups) and len({group[0] for group in groups}) == 4
    assert not set(seeds) & set(rollout_seeds(7, key, 0, 4, 3))
    assert group_noise_seeds(7, (0, 4, 1), 0, 4, 3) != seeds


@pytest.mark.parametrize(("name", "same"), [("sd3", True), ("sd", True), ("sd3", False)])
def test_init_same_noise_starts_a_group_from_one_noise(name, same, sd3_path, sd_path, tmp_path, monkeypatch):
    """With `init_same_noise` the images of a group start from the same initial latents (in the pipeline's layout)
    and differ at the end through their stochastic steps (Flow-SDE; DDIM with eta); other groups start elsewhere.
    Without it every image starts from its own noise. Training still recomputes the rollout exactly (ratio 1)."""
    trainer = grpo_trainer(sd3_path if name == "sd3" else sd_path, tmp_path, init_same_noise=same)
    results = []

    def kept(*args, **kwargs):
        results.append(rollout(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(grpo_module, "rollout", kept)
    trainer.train()
    (result,) = results
    initial, final = result.trajectory["latents"][:, 0], result.latents
    assert torch.equal(initial[0], initial[1]) == same and torch.equal(initial[2], initial[3]) == same
    assert not torch.equal(initial[0], initial[2])
    assert (final[0] - final[1]).abs().max() > 1e-3 and (final[2] - final[3]).abs().max() > 1e-3
    assert logged(trainer)[0]["importance_ratio/mean"] == 1.0


def test_resume_inside_a_reuse_window_continues_exactly(sd_path, tmp_path):
    """A checkpoint between two steps that share a rollout keeps the rollout; resuming from it ends with the weights
    of the uninterrupted run."""
    overrides = {"max_steps": 3, "num_iterations": 2, "save_strategy": "steps", "save_steps": 1,
                 "learning_rate": 3e-2}
    full = grpo_trainer(sd_path, tmp_path / "full", **overrides)
    full.train()
    assert (tmp_path / "full/out/checkpoint-1/online_buffer_0.safetensors").exists()
    resumed = grpo_trainer(sd_path, tmp_path / "full", **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full/out/checkpoint-1"))
    for key, value in lora_state(full).items():
        torch.testing.assert_close(lora_state(resumed)[key], value, rtol=0, atol=1e-7, msg=key)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, sd_path):
    """Each process samples its own groups with the seeds one process would use, the advantages come from the
    gathered rewards (batch std), and the run logs and ends like a single process with the same global batch."""
    ranks, single = on_policy_reports(tmp_path, "grpo", sd_path)
    ours, theirs = ranks[0]["logged"], single["logged"]
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for name in ("reward", "reward_std", "frac_reward_zero_std", "importance_ratio/mean"):
            if name in b:  # the rewards are logged at the steps that sample (0 and 2)
                assert a[name] == pytest.approx(b[name], rel=1e-6), name
        # The loss on reused samples is A * (ratio - 1) to first order: the float order of the gradient all-reduce
        # shows in its last digits.
        for name in ("kl", "loss"):
            assert a[name] == pytest.approx(b[name], abs=1e-6), name
    assert "reward" in ours[0] and "reward" not in ours[1]
    # Adam divides by the root of the squared gradient: where a gradient is near 0 the float order of the split batch
    # (2 images per forward instead of 4) shows; an update is lr = 1e-3 per step, so 5e-6 is 0.2% of one.
    for key, value in single["default"].items():
        np.testing.assert_allclose(ranks[0]["default"][key], value, rtol=1e-4, atol=5e-6, err_msg=key)


def test_bad_input_is_refused_by_name(sd_path, flux_path, tmp_path):
    with pytest.raises(ValueError, match="num_generations=1"):
        grpo_args(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="sde_window_size=4 .* larger than the num_inference_steps=3"):
        grpo_args(tmp_path, sde_window_size=4)
    # Guidance the pipeline ignores (test_grpo_families.py has each family's case).
    with pytest.raises(ValueError, match="guidance_scale=2.0 does nothing in FluxPipeline's sampling"):
        grpo_trainer(flux_path, tmp_path)
    with pytest.raises(ValueError, match="init_same_noise=True with noise_level=0: every step would be determ"):
        grpo_args(tmp_path, init_same_noise=True, noise_level=0.0)
    with pytest.raises(ValueError, match="dynamics='flow_sde' does not fit StableDiffusionPipeline"):
        grpo_trainer(sd_path, tmp_path, dynamics="flow_sde")
    trainer = grpo_trainer(sd_path, tmp_path, reward_funcs=short)
    with pytest.raises(ValueError, match="'short' returned 1 values for 4 images"):
        trainer.train()
    # The rollout's precomputed conditioning and initial-noise seeds.
    with pytest.raises(ValueError, match="`conditioning` has 3 rows for 4 prompts"):
        rollout(trainer.family, PROMPTS, [1, 2, 3, 4], 32, conditioning=({"encoder_hidden_states": torch.zeros(3)}, None))
    with pytest.raises(ValueError, match="Got 1 noise_seeds for 2 seeds"):
        rollout(trainer.family, PROMPTS[:2], [1, 2], 32, noise_seeds=[5])
    with pytest.raises(ValueError, match="Seed 1 is given two initial-noise seeds"):
        rollout(trainer.family, PROMPTS[:2], [1, 1], 32, noise_seeds=[5, 6])
    with pytest.raises(ValueError, match="'nan_reward' returned nan for image 1"):
        grpo_trainer(sd_path, tmp_path, reward_funcs=nan_reward).train()


def short(prompts, completions, **kwargs):
    return [1.0]


def nan_reward(prompts, completions, **kwargs):
    return [1.0, float("nan")] + [1.0] * (len(completions) - 2)


def test_evaluation_samples_with_the_deterministic_sampler_and_logs_the_reward(sd3_path, tmp_path):
    """`evaluate()` samples the eval prompts at `eval_num_inference_steps` with the pipeline's own sampler and logs
    the reward figures; the same seeds give the same figures."""
    trainer = DiffusionGRPOTrainer(model=sd3_path, reward_funcs=brightness,
                                   args=grpo_args(tmp_path, eval_num_inference_steps=2, per_device_eval_batch_size=2),
                                   train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                   eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}), peft_config=lora())
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first["eval_reward"] == again["eval_reward"] and 0 < first["eval_reward"] < 255
    assert "eval_rewards/brightness/mean" in first and "eval_frac_reward_zero_std" in first
    seeds = trainer.args.seed
    expected = rollout(trainer.family, [p for p in PROMPTS[:2] for _ in range(2)],
                       grpo_module.rollout_seeds(seeds, (1, 0), 0, 2, 2), 32, num_inference_steps=2,
                       guidance_scale=2.0)
    assert first["eval_reward"] == pytest.approx(np.mean(brightness(None, expected.images)), rel=1e-6)


def test_a_trained_step_equals_a_hand_computation(sd3_path, tmp_path):
    """One trained step of a reused rollout, recomputed here from the paper's formulas with the pipeline's own prompt
    encoding (torch.distributions for the density): the ratio, the clipped loss and the KL to the adapter-off base."""
    a, beta, epsilon = 0.7, 0.5, 1e-3
    trainer = grpo_trainer(sd3_path, tmp_path, learning_rate=3e-2, beta=beta, epsilon=epsilon)
    trainer.train()  # one update: the policy now differs from the rollout's and from the base
    batch, j = trainer._buffer.batches[0], 1
    inputs = {"batch": batch, "j": j, "conditioning": trainer._training_conditioning(batch)}
    loss, metrics = trainer.compute_loss(trainer.model, inputs, return_outputs=True)

    pipe = trainer.pipeline
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(batch["prompt"], None, None, negative_prompt="",
                                                                   do_classifier_free_guidance=True)
    x, t = batch["latents"][:, j], batch["timesteps"][:, j]
    sigma, sigma_next = batch["sigma"][:, j, None, None, None], batch["sigma_next"][:, j, None, None, None]

    def step_mean(transformer):
        with torch.no_grad():
            out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                              encoder_hidden_states=torch.cat([negative, embeds]),
                              pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]
        unconditional, conditional = out.chunk(2)
        v = unconditional + 2.0 * (conditional - unconditional)
        s = a * torch.sqrt(sigma / (1 - sigma))
        dt = sigma_next - sigma
        return x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, s, s * torch.sqrt(-dt)

    mean, s, std = step_mean(trainer.family.denoiser)
    with trainer.family.reference() as base:
        ref_mean, _, _ = step_mean(base)
    log_prob = torch.distributions.Normal(mean, std).log_prob(batch["next_latents"][:, j]).mean(dim=(1, 2, 3))
    ratio = torch.exp(log_prob - batch["log_prob"][:, j])
    A = batch["advantages"]
    policy = torch.maximum(-A * ratio, -A * ratio.clamp(1 - epsilon, 1 + epsilon)).mean()
    kl = ((mean - ref_mean) ** 2 / (2 * s**2)).mean(dim=(1, 2, 3)).mean()
    assert kl > 0 and (ratio - 1).abs().max() > 1e-6
    torch.testing.assert_close(metrics["importance_ratio/mean"], ratio.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["kl"], kl, rtol=1e-4, atol=1e-10)
    # The policy term is A * (ratio - 1) to first order: float rounding of the log-density shows at 1e-8.
    torch.testing.assert_close(loss.detach(), (policy + beta * kl) / len(batch["steps"]), rtol=1e-4, atol=1e-7)
    assert beta * kl / len(batch["steps"]) > 1e-5  # the KL term is far above that tolerance
