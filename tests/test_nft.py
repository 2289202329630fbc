"""DiffusionNFTTrainer on the tiny SD3 (flow) and SD1.x (epsilon) pipelines: the balance of the loss through the
trainer's wiring, the old policy's EMA, the training inputs, resume, and named errors. The loss formulas themselves
are tested in test_onpolicy_losses.py."""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import lora, on_policy_reports, recording_text_encoding
from transformers import TrainerCallback

from diffusion_dpo_trainer import DiffusionNFTConfig, DiffusionNFTTrainer
from diffusion_dpo_trainer.nft_trainer import OLD_POLICY_WEIGHTS

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun"]


def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def nft_args(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "resolution": 32, "per_device_train_batch_size": 2, "max_steps": 2,
              "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
              "dataloader_pin_memory": False, "num_generations": 2, "num_inference_steps": 3, "disable_tqdm": True}
    values.update(overrides)
    return DiffusionNFTConfig(**values)


def trainer_for(path, tmp_path, reward_funcs=brightness, callbacks=None, **overrides):
    return DiffusionNFTTrainer(model=path, reward_funcs=reward_funcs, args=nft_args(tmp_path, **overrides),
                               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=lora(),
                               callbacks=callbacks)


def adapter_state(trainer, adapter):
    return {k: v.detach().clone() for k, v in trainer.family.denoiser.state_dict().items() if f".{adapter}." in k}


def policy_gradients(trainer, optimality):
    """The gradient of the trainer's loss on one rollout, every image with optimality weight `optimality`."""
    batch = trainer._generate({"prompt": PROMPTS[:2]}, (0, 0, 0))
    batch["optimality"] = torch.full_like(batch["optimality"], optimality)
    timesteps = trainer._training_timesteps(batch)[:, 0]
    trainer.model.zero_grad()
    conditioning, _ = trainer._training_conditioning(batch)
    trainer.compute_loss(trainer.model, {**batch, "timesteps": timesteps, "conditioning": conditioning}).backward()
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])


@pytest.mark.parametrize("pipeline", ["sd3_path", "sd_path"])
def test_the_terms_balance_when_the_policy_is_the_old_policy_and_r_is_one_half(tmp_path, pipeline, request):
    """With the old policy a copy of the policy (as at the start) and r = 0.5 the positive and negative terms pull
    exactly against each other: no gradient, whatever the timestep and noise. With r = 1 there is one. A trainer whose
    old policy differed from the policy, or fed the two different inputs, would show a gradient at r = 0.5."""
    trainer = trainer_for(request.getfixturevalue(pipeline), tmp_path, beta=0.0)
    for p in trainer.model.parameters():  # a LoRA whose B is not zero, so the policy differs from the base
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    for old, policy in trainer.old_policy_pairs():
        old.data.copy_(policy.data)
    toward = policy_gradients(trainer, 1.0)
    balanced = policy_gradients(trainer, 0.5)
    assert toward.abs().max() > 1e-4
    assert balanced.abs().max() <= 1e-6 * toward.abs().max()


def test_the_old_policy_moves_as_its_schedule_says_and_never_moves_the_base(tmp_path, sd3_path):
    """After each rollout's last optimizer step: old <- d * old + (1 - d) * policy with d = min((step - flat) *
    uprate, uphold), 0 before `flat` (here flat 1, uprate 0.3, uphold 0.5: 0, 0.3, 0.5 for steps 1 to 3)."""
    seen = []

    class Snapshot(TrainerCallback):  # runs before the trainer's own update (callbacks passed in come first)
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((adapter_state(trainer, "old"), adapter_state(trainer, "default")))

    trainer = trainer_for(sd3_path, tmp_path, max_steps=3, ema_flat=1, ema_uprate=0.3, ema_uphold=0.5,
                          callbacks=[Snapshot()])
    base = {k: v.clone() for k, v in trainer.family.denoiser.state_dict().items() if "lora" not in k}
    trainer.train()
    final_old = adapter_state(trainer, "old")
    after = [s[0] for s in seen[1:]] + [final_old]
    for (old, policy), updated, decay in zip(seen, after, [0.0, 0.3, 0.5], strict=True):
        for key, value in old.items():
            expected = decay * value + (1 - decay) * policy[key.replace(".old.", ".default.")]
            torch.testing.assert_close(updated[key], expected, rtol=0, atol=1e-7)
    assert [h["nft/ema_decay"] for h in trainer.state.log_history if "loss" in h] == pytest.approx([0.0, 0.3, 0.5])
    for key, value in trainer.family.denoiser.state_dict().items():
        if "lora" not in key:
            assert torch.equal(value, base[key]), key
    assert any(not torch.equal(final_old[k], seen[0][0][k]) for k in final_old)


def test_training_noises_the_rollouts_clean_latents_with_fresh_noise_shared_by_the_three_models(tmp_path, sd3_path):
    """Each denoiser forward of a training step sees (1 - sigma) x0 + sigma eps with x0 the rollout's clean latents,
    the timestep one of the rollout's (a different one per trained timestep of an image), eps fresh per image and
    timestep, and the policy, the old policy and the base model exactly the same input."""
    trainer = trainer_for(sd3_path, tmp_path, max_steps=2, num_iterations=2, beta=1e-4, timestep_fraction=1.0)
    family, sampled, noised, calls = trainer.family, [], [], []
    sample, noisy_latents_and_target, predict = trainer._sample, family.noisy_latents_and_target, family.predict

    def recording_sample(prompts, seeds, conditioning):
        result = sample(prompts, seeds, conditioning)
        sampled.append((result[1].clone(), result[2].clone()))
        return result

    def recording_noise(x0, noise, timesteps):
        out = noisy_latents_and_target(x0, noise, timesteps)
        if x0.abs().sum() > 0 and noise.abs().sum() > 0:  # not clean_estimate's unit inputs
            noised.append((x0.clone(), noise.clone(), timesteps.clone(), out[0]))
        return out

    def recording_predict(denoiser, noisy, timesteps, conditioning):
        calls.append((noisy, timesteps))
        return predict(denoiser, noisy, timesteps, conditioning)

    trainer._sample = recording_sample
    family.noisy_latents_and_target, family.predict = recording_noise, recording_predict
    trainer.train()
    assert len(sampled) == 1  # reused at step 1
    latents, schedule = sampled[0]
    steps = trainer.args.num_train_timesteps
    assert steps == 3 and len(noised) == 2 * steps
    assert len(calls) == 3 * len(noised)
    for i, (x0, noise, timesteps, noisy) in enumerate(noised):
        torch.testing.assert_close(x0, latents, rtol=0, atol=0)
        for other in noised[:i]:
            assert not torch.allclose(noise, other[1])
        triple = calls[3 * i: 3 * i + 3]
        for noisy_seen, t_seen in triple:  # old policy, base, policy
            assert torch.equal(noisy_seen, noisy) and torch.equal(t_seen, timesteps)
        # each timestep is the nearest training timestep of one of the rollout's
        assert ((timesteps[:, None] - schedule[None, :]).abs().min(dim=1).values <= 1.0).all()
    for use in range(2):  # every image trains every one of the rollout's timesteps once per use (fraction 1.0)
        per_image = torch.stack([noised[use * steps + k][2] for k in range(steps)], dim=1)
        for row in per_image:
            assert len(set(row.tolist())) == steps


def test_a_rollout_encodes_its_prompts_once_and_every_forward_trains_on_their_own_conditioning(tmp_path, sd_path):
    """Without a text cache the text encoder runs in the rollout only (the prompts, then guidance's ""): the trained
    timesteps and the optimizer step that reuses the rollout read the prompts' conditioning from the batch, which keeps
    one row per prompt and no negative. The policy, old policy and base forwards see each image's prompt conditioning,
    unguided, as a fresh encoding of the images' prompts gives it."""
    trainer = trainer_for(sd_path, tmp_path, max_steps=2, num_iterations=2, guidance_scale=2.0, beta=1e-2)
    with recording_text_encoding(trainer) as (encoded, seen):
        trainer.train()
    assert encoded == [0, 0]  # step 0's rollout: the prompts and the negative; step 1 reuses it
    batch = trainer._buffer.batches[0]
    assert len(batch["prompt"]) == 4 and len(batch["conditioning/encoder_hidden_states"]) == 2
    assert not any(key.startswith("negative/") for key in batch)
    assert len(seen) == 2 * trainer.args.num_train_timesteps * 3  # per step and timestep: old policy, base, policy
    with torch.no_grad():
        expected = trainer.family.encode_prompt(batch["prompt"], torch.device("cpu"))["encoder_hidden_states"]
    for states in seen:
        torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tmp_path, sd3_path):
    """A run stopped inside a num_iterations window and resumed ends with the policy, the old policy and the losses of
    the uninterrupted run (the reused rollout, the optimizer and the old policy come from the checkpoint)."""
    full = trainer_for(sd3_path, tmp_path / "full", max_steps=3, num_iterations=2, ema_decay_type=2, ema_flat=0)
    full.train()
    class StopAfterOneStep(TrainerCallback):  # an interrupted run: the same schedules as the full one
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    first = trainer_for(sd3_path, tmp_path / "resumed", max_steps=3, num_iterations=2, ema_decay_type=2, ema_flat=0,
                        save_strategy="steps", save_steps=1, callbacks=[StopAfterOneStep()])
    first.train()
    checkpoint = str(tmp_path / "resumed" / "out" / "checkpoint-1")
    assert os.path.isfile(os.path.join(checkpoint, OLD_POLICY_WEIGHTS))
    with open(os.path.join(checkpoint, "README.md"), encoding="utf-8") as f:  # the card names the method and knobs
        card = f.read()
    assert "# DiffusionNFT fine-tune" in card and "`nft_beta`: 1" in card and "`ema_uphold`: 0.999" in card
    resumed = trainer_for(sd3_path, tmp_path / "resumed", max_steps=3, num_iterations=2, ema_decay_type=2, ema_flat=0,
                          save_strategy="steps", save_steps=1)
    sampled = []
    sample = resumed._sample
    resumed._sample = lambda prompts, seeds, conditioning: sampled.append(seeds) or sample(prompts, seeds, conditioning)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert len(sampled) == 1  # step 1 reuses the checkpoint's rollout; step 2 samples
    for adapter in ("default", "old"):
        ours, theirs = adapter_state(resumed, adapter), adapter_state(full, adapter)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-7)
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert len(losses) == 3 and resumed_losses == pytest.approx(losses, rel=1e-6)  # step 1 from the checkpoint

    os.remove(os.path.join(checkpoint, OLD_POLICY_WEIGHTS))
    again = trainer_for(sd3_path, tmp_path / "resumed", max_steps=3, num_iterations=2)
    with pytest.raises(ValueError, match=OLD_POLICY_WEIGHTS):
        again.train(resume_from_checkpoint=checkpoint)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, sd3_path):
    """Each process samples its own prompts with the seeds one process would use, the advantages come from the gathered
    rewards, and the run logs and ends with what one process with the same global batch does."""
    ranks, single = on_policy_reports(tmp_path, "nft", sd3_path)
    logged, single_logged = ranks[0]["logged"], single["logged"]
    assert "reward" in logged[0] and "nft/ema_decay" in logged[1]
    for ours, theirs in zip(logged, single_logged, strict=True):
        assert set(ours) == set(theirs)
        for name in ("reward", "reward_std", "frac_reward_zero_std", "nft/ema_decay"):
            if name in theirs:  # rewards at the steps that sample, the decay at the steps that end a rollout
                assert ours[name] == pytest.approx(theirs[name], rel=1e-9), name
        for name in ("loss", "nft/positive_loss", "nft/negative_loss", "kl"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-9), name
    for adapter in ("default", "old"):
        for key, value in single[adapter].items():
            np.testing.assert_allclose(ranks[0][adapter][key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_bad_input_gets_a_named_error(tmp_path, sd3_path):
    with pytest.raises(ValueError, match="peft_config"):
        DiffusionNFTTrainer(model=sd3_path, reward_funcs=brightness, args=nft_args(tmp_path),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(TypeError, match="DiffusionNFTConfig"):
        DiffusionNFTTrainer(model=sd3_path, reward_funcs=brightness, args=object(), peft_config=lora())
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1"):
        trainer_for(sd3_path, tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="eval_dataset"):
        DiffusionNFTTrainer(model=sd3_path, reward_funcs=brightness, args=nft_args(tmp_path), peft_config=lora(),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                            eval_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match="Row 1, column 'prompt'"):
        DiffusionNFTTrainer(model=sd3_path, reward_funcs=brightness, args=nft_args(tmp_path), peft_config=lora(),
                            train_dataset=Dataset.from_dict({"prompt": ["a cat", ""]}))
    for field, value, message in [("num_generations", 1, "num_generations"), ("nft_beta", 0.0, "nft_beta"),
                                  ("timestep_fraction", 0.0, "timestep_fraction"), ("beta", -1.0, "beta"),
                                  ("scale_rewards", "prompt", "scale_rewards"), ("ema_decay_type", 3, "ema_decay_type"),
                                  ("nft_timesteps", "uniform", "nft_timesteps"), ("ema_uphold", 1.0, "ema_uphold")]:
        with pytest.raises(ValueError, match=message):
            nft_args(tmp_path, **{field: value})
    trainer = trainer_for(sd3_path, tmp_path, reward_funcs=lambda prompts, completions, **kw: [float("nan")] * len(
        completions))
    with pytest.raises(ValueError, match="finite"):
        trainer.train()


@pytest.mark.parametrize("pipeline", ["sd3_path", "sd_path", "sd_v_path"])
def test_the_clean_estimate_inverts_the_familys_forward_process(trainer_family, pipeline, request):
    """x0_hat of the exact target is x0, for flows, epsilon- and v-prediction (the NFT loss trains on x0_hat)."""
    family = trainer_family(request.getfixturevalue(pipeline))
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    timesteps = family.schedule_timesteps(torch.tensor([900.0, 500.0, 20.0]))
    noisy, target = family.noisy_latents_and_target(x0, noise, timesteps)
    torch.testing.assert_close(family.clean_estimate(noisy, target, timesteps), x0, rtol=1e-4, atol=1e-4)


@pytest.fixture
def trainer_family(tmp_path):
    from diffusion_dpo_trainer.families import load_family

    return lambda path: load_family(path, nft_args(tmp_path))


def test_training_timesteps_from_the_schedule_or_the_familys_training_distribution(tmp_path, sd3_path):
    """`schedule`: per image a random subset of the rollout's timesteps, on the training grid; `training`: the
    family's own draws (any timestep of the training grid, not only the rollout's)."""
    trainer = trainer_for(sd3_path, tmp_path, num_inference_steps=4, timestep_fraction=0.5)
    grid = trainer.family._timesteps
    schedule = torch.tensor([1000.0, 750.0, 500.0, 250.0]).expand(64, -1)
    drawn = trainer._training_timesteps({"latents": torch.zeros(64, 1), "schedule": schedule})
    assert drawn.shape == (64, 2)
    assert all(len(set(row.tolist())) == 2 for row in drawn)
    assert torch.isin(drawn, grid).all()
    assert ((drawn[..., None] - schedule[0]).abs().min(dim=-1).values <= 1.0).all()
    trainer.args.nft_timesteps = "training"
    drawn = trainer._training_timesteps({"latents": torch.zeros(64, 1), "schedule": schedule})
    assert drawn.shape == (64, 2) and torch.isin(drawn, grid).all()
    assert ((drawn[..., None] - schedule[0]).abs().min(dim=-1).values > 1.0).any()
