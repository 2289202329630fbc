"""DiffusionGRPOTrainer on the tiny SD3 (Flow-SDE) and SD1.x (DDIM with eta) pipelines: the rollout is the pipeline's
sampler, training recomputes exactly what the rollout saw, the wiring of the loss, resume, two processes, errors."""


import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import DenoiserRecorder, lora, on_policy_reports

import diffusion_dpo_trainer.grpo_trainer as grpo_module
from diffusion_dpo_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_dpo_trainer.rollout import rollout

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
    rollout_calls, training_calls = recorder.calls[:3], recorder.calls[3:]
    assert len(training_calls) == 2 * len(steps)  # policy, then reference (adapter off), per trained step
    for k, j in enumerate(steps):
        for call in training_calls[2 * k : 2 * k + 2]:
            assert call.keys() == rollout_calls[j].keys()
            for key, value in call.items():
                expected = rollout_calls[j][key]
                if expected.ndim == 0:  # SD's pipeline passes one timestep for the batch
                    expected = expected.expand(value.shape)
                assert torch.equal(value.float(), expected.float()), (j, key)
    (log,) = logged(trainer)
    assert log["importance_ratio/mean"] == 1.0
    assert [log[f"importance_ratio/step_{j}"] for j in steps] == [1.0] * len(steps)


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


def test_bad_input_is_refused_by_name(sd_path, sdxl_path, flux_path, tmp_path):
    with pytest.raises(ValueError, match="num_generations=1"):
        grpo_args(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="sde_window_size=4 .* larger than the num_inference_steps=3"):
        grpo_args(tmp_path, sde_window_size=4)
    with pytest.raises(ValueError, match="does not support SDXL"):
        grpo_trainer(sdxl_path, tmp_path)
    with pytest.raises(ValueError, match="does not support FluxPipeline"):
        grpo_trainer(flux_path, tmp_path)
    with pytest.raises(ValueError, match="dynamics='flow_sde' does not fit StableDiffusionPipeline"):
        grpo_trainer(sd_path, tmp_path, dynamics="flow_sde")
    with pytest.raises(ValueError, match="'short' returned 1 values for 4 images"):
        grpo_trainer(sd_path, tmp_path, reward_funcs=short).train()
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
    inputs = {"batch": batch, "j": j, "conditioning": trainer._conditioning(batch["prompt"])}
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
