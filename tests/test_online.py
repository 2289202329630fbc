"""DiffusionOnlineDPOTrainer on the tiny SD1.x pipeline: on-policy samples, the offline loss path, rewards and judges,
reference sync, resume, and bad input."""

import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import LN2, lora, on_policy_reports, one_thread, recording_text_encoding
from helpers import make_args as offline_args
from onpolicy_ddp_worker import BETA as ONLINE_BETA
from transformers import TrainerCallback, TrainerState

from diffusion_dpo_trainer import DiffusionDPOTrainer, DiffusionOnlineDPOConfig, DiffusionOnlineDPOTrainer
from diffusion_dpo_trainer.sampling import iter_sample_batches

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun"]


def prompts_dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "style": ["flat", "round", "leafy", "bright"]})


def online_args(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "resolution": 32, "per_device_train_batch_size": 2, "max_steps": 2,
              "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
              "dataloader_pin_memory": False, "beta": 5000, "num_images_per_prompt": 2, "num_inference_steps": 2,
              "guidance_scale": 1.0, "disable_tqdm": True}
    values.update(overrides)
    return DiffusionOnlineDPOConfig(**values)


def grey(image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def brightness(prompts, completions, **kwargs):
    """TRL's convention: keyword arguments, one float per completion (here, an image)."""
    return [float(grey(image).mean()) for image in completions]


def trainer_for(sd_path, tmp_path, reward_funcs=brightness, peft_config="lora", **overrides):
    return DiffusionOnlineDPOTrainer(model=sd_path, reward_funcs=reward_funcs, args=online_args(tmp_path, **overrides),
                                     train_dataset=prompts_dataset(),
                                     peft_config=lora() if peft_config == "lora" else peft_config)


def record_batches(trainer):
    """Keep every batch compute_loss sees, with the RNG state it starts from and the loss it returns."""
    seen, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        state = torch.get_rng_state()
        loss = compute_loss(model, inputs, *args, **kwargs)
        seen.append({"inputs": dict(inputs), "rng": state, "loss": loss.detach().clone()})
        return loss

    trainer.compute_loss = recording
    return seen


def lora_state(module, adapter="default"):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if f".{adapter}." in k}


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_samples_come_from_the_policy_being_trained(tmp_path, sd_path):
    """Every group is sampled by the current policy (adapter on): re-sampling its seeds with the adapter gives the
    same images, without it (the base model) other images once the adapter has trained."""
    trainer = trainer_for(sd_path, tmp_path, max_steps=3)
    sample, checks = trainer._sample, []

    def checked(prompts, seeds, conditioning):
        images, latents = sample(prompts, seeds, conditioning)
        kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 32, "width": 32, "progress": False,
                  "batch_size": len(prompts)}
        (again, _), = iter_sample_batches(trainer.pipeline, prompts, seeds, return_latents=True, **kwargs)
        with trainer.family.reference_pipeline() as base:  # the base model: the LoRA switched off
            (base_images, _), = iter_sample_batches(base, prompts, seeds, return_latents=True, **kwargs)
        checks.append((trainer.state.global_step, [np.array_equal(grey(a), grey(b)) for a, b in zip(images, again)],
                       max(np.abs(grey(a) - grey(b)).max() for a, b in zip(images, base_images))))
        return images, latents

    trainer._sample = checked
    trainer.train()
    assert [step for step, _, _ in checks] == [0, 1, 2]
    assert all(all(same) for _, same, _ in checks), "the policy's own samples were not reproduced by the policy"
    assert checks[0][2] == 0  # the LoRA starts as a no-op: policy == base
    assert checks[1][2] > 0 and checks[2][2] > 0, "samples after an update are the base model's"


def test_training_batch_holds_the_sampled_latents_of_the_best_and_worst_image(tmp_path, sd_path):
    trainer = trainer_for(sd_path, tmp_path, max_steps=1, num_images_per_prompt=3)
    sample, sampled = trainer._sample, []
    trainer._sample = lambda *args: sampled.append(sample(*args)) or sampled[-1]
    seen = record_batches(trainer)
    trainer.train()
    (images, latents), = sampled
    batch = seen[0]["inputs"]
    scores = np.array(brightness(None, images)).reshape(2, 3)
    for g in range(2):
        assert torch.equal(batch["chosen_latents"][g].cpu(), latents[3 * g + scores[g].argmax()])
        assert torch.equal(batch["rejected_latents"][g].cpu(), latents[3 * g + scores[g].argmin()])
    assert batch["prompt"] == [PROMPTS[i] for i in _first_window(trainer)]


def _first_window(trainer):
    """The dataset rows of the first micro-batch (the sampler's first window)."""
    return list(trainer._get_train_sampler())[: trainer.args.per_device_train_batch_size]


def test_loss_on_generated_pairs_equals_the_offline_trainers_loss(tmp_path, sd_path):
    """Same pairs, latents, noise and timesteps (the same RNG state) and the same policy weights: the offline trainer's
    loss and metrics are the online ones, at the first step (ln 2: the LoRA starts as a no-op) and after an update."""
    trainer = trainer_for(sd_path, tmp_path, max_steps=2)
    seen = record_batches(trainer)
    weights = []
    trainer.add_callback(_RecordLoRA(weights))
    initial = lora_state(trainer.model)
    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert abs(losses_of(trainer)[1] - LN2) > 1e-4
    offline = DiffusionDPOTrainer(model=sd_path, args=offline_args(tmp_path / "offline", beta=5000),
                                  peft_config=lora())
    for step, state in zip(seen, [initial, weights[0]], strict=True):
        offline.model.load_state_dict(state, strict=False)
        batch = {k: v for k, v in step["inputs"].items() if k not in ("valid", "num_pairs")}
        torch.set_rng_state(step["rng"])
        loss, metrics = offline.compute_loss(offline.model, batch, return_outputs=True)
        assert loss.item() == pytest.approx(step["loss"].item(), rel=1e-6, abs=1e-7)
    logged = trainer.state.log_history[1]
    for name in ("rewards/chosen", "rewards/margins", "mse/chosen", "ref_mse/rejected"):
        assert metrics[name].item() == pytest.approx(logged[name], rel=1e-5, abs=1e-6), name


class _RecordLoRA(TrainerCallback):
    """A callback keeping the policy adapter after every optimizer step."""

    def __init__(self, store):
        self.store = store

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.store.append(lora_state(model))


def test_a_tied_prompt_is_left_out_of_the_loss(tmp_path, sd_path):
    """A prompt whose images all score the same gives no pair: the loss is the offline loss over the other pairs only,
    with their own noise and timesteps."""
    def tie_first_prompt(prompts, completions, **kwargs):
        return [0.0 if p == prompts[0] else float(grey(im).mean()) for p, im in zip(prompts, completions)]

    trainer = trainer_for(sd_path, tmp_path, reward_funcs=tie_first_prompt, max_steps=2)
    seen = record_batches(trainer)
    weights = []
    trainer.add_callback(_RecordLoRA(weights))
    trainer.train()
    step = seen[1]
    assert step["inputs"]["valid"].tolist() == [False, True]
    assert trainer.state.log_history[1]["objective/no_pair_fraction"] == 0.5
    offline = DiffusionDPOTrainer(model=sd_path, args=offline_args(tmp_path / "offline", beta=5000),
                                  peft_config=lora())
    offline.model.load_state_dict(weights[0], strict=False)
    batch = {k: v for k, v in step["inputs"].items() if k not in ("valid", "num_pairs")}
    torch.set_rng_state(step["rng"])
    policy, reference = offline._denoising_errors(offline.model, batch)  # both slots, the same draws
    m_w, m_l, r_w, r_l = policy[1], policy[3], reference[1], reference[3]  # the second slot only
    expected = -torch.nn.functional.logsigmoid(-2500.0 * ((m_w - r_w) - (m_l - r_l)))
    assert step["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_rewards_get_the_prompts_and_the_other_columns(tmp_path, sd_path):
    calls = {"trl": [], "ours": []}

    def trl_style(prompts, completions, style, trainer_state, **kwargs):
        calls["trl"].append({"prompts": prompts, "n": len(completions), "style": style,
                             "step": trainer_state.global_step})
        return [float(grey(im).mean()) for im in completions]

    class Ours:
        def __call__(self, images, prompts):
            calls["ours"].append(list(prompts))
            return [0.0] * len(images)

    trainer = trainer_for(sd_path, tmp_path, reward_funcs=[trl_style, Ours()], max_steps=1, num_images_per_prompt=3)
    trainer.train()
    rows = _first_window(trainer)
    expected_prompts = [PROMPTS[r] for r in rows for _ in range(3)]
    styles = prompts_dataset()["style"]
    (trl,) = calls["trl"]
    assert trl == {"prompts": expected_prompts, "n": 6, "style": [styles[r] for r in rows for _ in range(3)], "step": 0}
    assert calls["ours"] == [expected_prompts]
    assert trainer.reward_func_names == ["trl_style", "Ours"]
    assert "objective/scores/trl_style" in trainer.state.log_history[0]


def test_reward_weights_combine_as_documented(tmp_path, sd_path):
    trainer = trainer_for(sd_path, tmp_path, reward_funcs=[brightness, brightness], max_steps=1,
                          reward_weights=[0.5, -2.0])
    # The combination itself (NaN: not scored) is tested in test_scoring.py.
    # End to end: 0.5 b - 2 b = -1.5 b, so the darker image of each group is chosen.
    sample, sampled = trainer._sample, []
    trainer._sample = lambda *args: sampled.append(sample(*args)) or sampled[-1]
    seen = record_batches(trainer)
    trainer.train()
    (images, latents), = sampled
    b = np.array(brightness(None, images)).reshape(2, 2)
    for g in range(2):
        assert torch.equal(seen[0]["inputs"]["chosen_latents"][g].cpu(), latents[2 * g + b[g].argmin()])
    logged = trainer.state.log_history[0]
    assert logged["objective/scores"] == pytest.approx(-1.5 * b.mean(), rel=1e-6)
    assert logged["objective/scores_margin"] == pytest.approx(np.mean(1.5 * (b.max(1) - b.min(1))), rel=1e-6)


class BrighterJudge:
    """TRL's pairwise-judge interface: the index of the better completion, -1 when undecided."""

    def __init__(self, undecided=False):
        self.undecided = undecided
        self.calls = []

    def judge(self, prompts, completions, shuffle_order=True):
        self.calls.append(list(prompts))
        if self.undecided:
            return [-1] * len(prompts)
        return [int(grey(b).mean() > grey(a).mean()) for a, b in completions]


def test_a_judge_picks_the_pairs(tmp_path, sd_path):
    judge = BrighterJudge()
    trainer = DiffusionOnlineDPOTrainer(model=sd_path, judge=judge, args=online_args(tmp_path, max_steps=1,
                                        num_images_per_prompt=4), train_dataset=prompts_dataset(), peft_config=lora())
    sample, sampled = trainer._sample, []
    trainer._sample = lambda *args: sampled.append(sample(*args)) or sampled[-1]
    seen = record_batches(trainer)
    trainer.train()
    (images, latents), = sampled
    rows = _first_window(trainer)
    assert judge.calls == [[PROMPTS[r] for r in rows for _ in range(2)]]  # images (0, 1) and (2, 3) of each prompt
    b = np.array(brightness(None, images)).reshape(4, 2)
    chosen = seen[0]["inputs"]["chosen_latents"].cpu()
    for k in range(4):
        assert torch.equal(chosen[k], latents[2 * k + b[k].argmax()])


def test_a_step_without_any_pair_changes_nothing(tmp_path, sd_path):
    trainer = DiffusionOnlineDPOTrainer(model=sd_path, judge=BrighterJudge(undecided=True),
                                        args=online_args(tmp_path, max_steps=2), train_dataset=prompts_dataset(),
                                        peft_config=lora())
    before = lora_state(trainer.model)
    trainer.train()
    after = lora_state(trainer.model)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert [h["objective/no_pair_fraction"] for h in trainer.state.log_history if "loss" in h] == [1.0, 1.0]


def test_steps_without_pairs_warn_and_stop_after_the_patience(tmp_path, sd_path):
    """A reward that scores nothing forms no pair: the first such step warns, `no_pair_patience` of them stop."""
    def unscored(prompts, completions, **kwargs):
        return [None] * len(completions)

    trainer = trainer_for(sd_path, tmp_path, reward_funcs=unscored, max_steps=4, no_pair_patience=2)
    with pytest.warns(UserWarning, match="Step 1 formed no preference pair"), \
            pytest.raises(ValueError, match=r"No preference pair in 2 consecutive optimizer steps .* up to step 2"):
        trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="no_pair_patience must be >= 1"):
        online_args(tmp_path, no_pair_patience=0)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_lora_reference_sync_and_mixup(tmp_path, sd_path, alpha):
    """Every `ref_model_sync_steps` steps the 'ref' adapter becomes alpha * policy + (1 - alpha) * ref; the policy is
    untouched; the reference forward uses the synced adapter (alpha 1: the next step starts at ln 2 again)."""
    weights = []
    trainer = trainer_for(sd_path, tmp_path, max_steps=3, sync_ref_model=True, ref_model_sync_steps=2,
                          ref_model_mixup_alpha=alpha)
    trainer.add_callback(_RecordLoRA(weights))
    refs = []
    trainer.add_callback(_RecordAfterSync(refs))
    initial_ref = lora_state(trainer.model, "ref")
    assert all(torch.equal(v, lora_state(trainer.model)[k.replace(".ref.", ".default.")])
               for k, v in initial_ref.items())
    trainer.train()
    # step 1: no sync
    assert all(torch.equal(v, refs[0][k]) for k, v in initial_ref.items())
    # step 2: sync, exactly as documented, and never the other way round
    for key, ref in refs[1].items():
        policy = weights[1][key.replace(".ref.", ".default.")]
        previous = refs[0][key]
        assert torch.allclose(ref, previous + alpha * (policy - previous), atol=1e-7), key
    assert all(torch.equal(v, lora_state(trainer.model)[k]) for k, v in weights[2].items())  # policy untouched
    losses = losses_of(trainer)
    if alpha == 1.0:
        assert losses[2] == pytest.approx(LN2, abs=1e-6)
    else:
        assert abs(losses[2] - LN2) > 1e-4
    # Saved for use: only the policy adapter.
    trainer.save_model()
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert saved and not any(".ref" in key for key in saved)


class _RecordAfterSync(_RecordLoRA):
    """Added after the trainer's own sync callback: sees the reference adapter after the sync."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.store.append(lora_state(model, "ref"))


def test_full_finetune_reference_sync(tmp_path, sd_path):
    trainer = trainer_for(sd_path, tmp_path, peft_config=None, max_steps=2, sync_ref_model=True,
                          ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, learning_rate=1e-4)
    before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    policy = {}

    class Keep(_RecordLoRA):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            policy.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer.callback_handler.callbacks.insert(0, Keep(None))
    trainer.train()
    after = trainer.ref_model.state_dict()
    changed = 0
    for key, value in before.items():
        expected = value + 0.5 * (policy[key] - value)
        assert torch.allclose(after[key], expected, atol=1e-6), key
        changed += not torch.equal(after[key], value)
    assert changed
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in policy.items())


def test_resume_continues_with_the_same_samples_reference_and_weights(tmp_path, sd_path, monkeypatch):
    """Reused samples (num_iterations=2), a mixed-in reference and an epoch boundary: resuming from checkpoint-3
    (half-way through a reuse cycle) gives the uninterrupted run's losses and weights. The on-policy state is on
    disk before trainer_state.json marks the checkpoint complete, and a checkpoint without it is refused by name."""
    config = {"max_steps": 5, "num_iterations": 2, "sync_ref_model": True, "ref_model_sync_steps": 2,
              "ref_model_mixup_alpha": 0.5, "save_strategy": "steps", "save_steps": 3}
    full = trainer_for(sd_path, tmp_path / "full", **config)
    present_at_state, save_to_json = [], TrainerState.save_to_json

    def checking(self, path):
        folder = os.path.dirname(path)
        present_at_state.append(sorted(f for f in os.listdir(folder) if f.startswith(("online_", "reference"))))
        save_to_json(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", checking)
    full.train()
    monkeypatch.undo()
    # checkpoint-3 and the last one (5): both inside a reuse window, both with their buffer and reference.
    assert present_at_state == [["online_buffer_0.json", "online_buffer_0.safetensors", "reference.safetensors"]] * 2
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    for name, damage in [("online_buffer_0.safetensors", "remove"), ("online_buffer_0.safetensors", "truncate"),
                         ("online_buffer_0.json", "truncate"), ("trainer_state.json", "remove")]:
        broken = tmp_path / f"broken-{name}-{damage}"
        shutil.copytree(checkpoint, broken)
        if damage == "remove":
            (broken / name).unlink()
        else:
            (broken / name).write_bytes((broken / name).read_bytes()[:20])
        refused = f"Cannot resume: {re.escape(str(broken / name))} is missing or unreadable"
        with pytest.raises(ValueError, match=refused):
            trainer_for(sd_path, tmp_path / "refused", **config).train(resume_from_checkpoint=str(broken))
    resumed = trainer_for(sd_path, tmp_path / "resumed", **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert len(losses_of(full)) == len(losses_of(resumed)) == 5  # the resumed history starts with the first 3
    assert losses_of(resumed)[3:] == pytest.approx(losses_of(full)[3:], abs=1e-6)
    for adapter in ("default", "ref"):
        expected, actual = lora_state(full.model, adapter), lora_state(resumed.model, adapter)
        assert expected.keys() == actual.keys()
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_a_rollout_encodes_its_prompts_once_for_sampling_and_every_step_that_trains_on_it(tmp_path, sd_path):
    """Without a text cache the text encoder runs in the rollout only (the prompts, then guidance's ""): the DPO step
    and the optimizer step that reuses the rollout read the prompts' conditioning from the batch, which keeps one row
    per prompt (shared by its pair slots, here 6) and no negative (the DPO step does not guide). The policy and
    reference forwards see each pair's prompt conditioning, as a fresh encoding of the pairs' prompts gives it."""
    trainer = trainer_for(sd_path, tmp_path, max_steps=2, num_iterations=2, guidance_scale=2.0,
                          num_images_per_prompt=4, pair_strategy="all_pairs")
    with recording_text_encoding(trainer) as (encoded, seen):
        trainer.train()
    assert encoded == [0, 0]  # step 0's rollout: the prompts and the negative; step 1 reuses it
    batch = trainer._buffer.batches[0]
    assert len(batch["prompt"]) == 12 and len(batch["conditioning/encoder_hidden_states"]) == 2
    assert not any(key.startswith("negative/") for key in batch)
    assert len(seen) == 2 * 2  # per step: reference, policy
    with torch.no_grad():
        expected = trainer.family.encode_prompt(batch["prompt"] * 2, torch.device("cpu"))["encoder_hidden_states"]
    for states in seen:  # winners then losers
        torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-6)


def test_evaluation_samples_and_scores_the_eval_prompts(tmp_path, sd_path):
    trainer = DiffusionOnlineDPOTrainer(model=sd_path, reward_funcs=brightness, args=online_args(tmp_path),
                                        train_dataset=prompts_dataset(), eval_dataset=prompts_dataset(),
                                        peft_config=lora())
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["eval_objective/scores"] == second["eval_objective/scores"]  # the same seeds every evaluation
    assert 0 < first["eval_objective/scores"] < 255


# ----- bad input ----------------------------------------------------------------------------------------------------
def test_bad_configuration_is_refused(tmp_path, sd_path):
    with pytest.raises(ValueError, match="num_images_per_prompt must be at least 2"):
        online_args(tmp_path, num_images_per_prompt=1)
    with pytest.raises(ValueError, match="precompute_latents does not apply"):
        online_args(tmp_path, precompute_latents=True)
    with pytest.raises(ValueError, match="Unknown pair_strategy"):
        online_args(tmp_path, pair_strategy="random")
    with pytest.raises(ValueError, match="'prompt' column"):
        DiffusionOnlineDPOTrainer(model=sd_path, reward_funcs=brightness, args=online_args(tmp_path),
                                  train_dataset=Dataset.from_dict({"caption": ["a"]}))
    with pytest.raises(ValueError, match="Row 1, column 'prompt'"):
        DiffusionOnlineDPOTrainer(model=sd_path, reward_funcs=brightness, args=online_args(tmp_path),
                                  train_dataset=Dataset.from_dict({"prompt": ["a", ""]}))
    with pytest.raises(ValueError, match="exactly one of `reward_funcs`"):
        DiffusionOnlineDPOTrainer(model=sd_path, args=online_args(tmp_path), train_dataset=prompts_dataset())
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2"):
        DiffusionOnlineDPOTrainer(model=sd_path, reward_funcs=[brightness, brightness],
                                  args=online_args(tmp_path, reward_weights=[1.0]), train_dataset=prompts_dataset())
    with pytest.raises(ValueError, match="num_images_per_prompt must be even"):
        DiffusionOnlineDPOTrainer(model=sd_path, judge=BrighterJudge(), args=online_args(tmp_path,
                                  num_images_per_prompt=3), train_dataset=prompts_dataset())


@pytest.mark.parametrize(("returned", "error", "message"), [
    (lambda n: [1.0] * (n - 1), ValueError, r"'bad' returned 3 values for 4 images"),
    (lambda n: [1.0, math.nan] + [1.0] * (n - 2), ValueError, r"'bad' returned nan for image 1 \(prompt '.+'\)"),
    (lambda n: [1.0, 2.0, "high"] + [1.0] * (n - 3), TypeError, r"'bad' returned 'high' \(str\) for image 2"),
])
def test_a_bad_reward_gets_a_clear_error(tmp_path, sd_path, returned, error, message):
    def bad(prompts, completions, **kwargs):
        return returned(len(completions))

    trainer = trainer_for(sd_path, tmp_path, reward_funcs=bad, max_steps=1)
    with pytest.raises(error, match=message):
        trainer.train()


def test_none_rewards_leave_images_unscored(tmp_path, sd_path):
    """None is TRL's "not scored": an image no reward scored is never paired."""
    def only_first_prompt(prompts, completions, **kwargs):
        return [float(grey(im).mean()) if p == prompts[0] else None for p, im in zip(prompts, completions)]

    trainer = trainer_for(sd_path, tmp_path, reward_funcs=only_first_prompt, max_steps=1)
    seen = record_batches(trainer)
    trainer.train()
    assert seen[0]["inputs"]["valid"].tolist() == [True, False]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, sd_path):
    """Each process samples its own prompts with the seeds one process would use for them, trains on its own pairs,
    and the run logs what a single process with the same global batch logs, and ends with the same weights."""
    ranks, single = on_policy_reports(tmp_path, "online", sd_path)
    logged, single_logged = ranks[0]["logged"], single["logged"]
    # Step 0 samples from identical weights: its scores are the same to the last bit. Step 2 samples from weights
    # after two optimizer steps, which DDP's all-reduced gradients leave equal only to float rounding (the LoRA check
    # below): there one 8-bit pixel may round the other way, 1/8192 of the brightness mean (1 / 1024 pixels / 8
    # images), so a few such flips are allowed, far below what a wrong prompt or seed changes.
    pixel_level = 1 / (32 * 32 * 8)
    for step, (ours, theirs) in enumerate(zip(logged, single_logged, strict=True)):
        for name in ("objective/scores", "objective/scores_std", "objective/scores_margin"):
            if name in theirs:
                expected = (pytest.approx(theirs[name], rel=1e-9) if step == 0
                            else pytest.approx(theirs[name], abs=4 * pixel_level))
                assert ours[name] == expected, (step, name)
        for name in ("mse/chosen", "ref_mse/rejected"):
            assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
        for name in ("loss", "rewards/margins"):
            assert ours[name] == pytest.approx(theirs[name], abs=ONLINE_BETA / 2 * 1e-6), name
    for key, value in single["default"].items():
        np.testing.assert_allclose(ranks[0]["default"][key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_cached_prompt_embeddings_and_small_generation_batches_train_the_same(tmp_path, sd_path):
    """precompute_text_embeddings feeds the training step from the cache, generation_batch_size only splits the
    pipeline calls: the run logs the same losses as the plain one."""
    with one_thread():  # sampling 1 image per call vs all at once: the same reduction order only on one thread
        plain = trainer_for(sd_path, tmp_path / "plain", max_steps=2)
        plain.train()
        cached = trainer_for(sd_path, tmp_path / "cached", max_steps=2, precompute_text_embeddings=True,
                             generation_batch_size=1)
        assert len(cached.data_collator.prompt_embeddings) == len(PROMPTS)
        seen = record_batches(cached)
        cached.train()
    cache = cached.data_collator.prompt_embeddings
    for step in seen:  # the step reads the rollout's conditioning: the cache's rows, one per prompt (one pair each)
        kept = step["inputs"]["conditioning/encoder_hidden_states"].cpu()
        assert torch.equal(kept, cache(step["inputs"]["prompt"])["encoder_hidden_states"])
    assert losses_of(cached) == pytest.approx(losses_of(plain), abs=1e-5)


def test_rollouts_sample_from_the_text_cache_with_the_encoders_released(tmp_path, sd_path):
    """With guidance, the cache also holds guidance's "" and the rollouts need no text encoder: they are released."""
    trainer = trainer_for(sd_path, tmp_path, max_steps=1, guidance_scale=2.0, precompute_text_embeddings=True,
                          release_cached_encoders=True)
    assert trainer.family.text_encoders == [] and len(trainer.data_collator.prompt_embeddings) == len(PROMPTS) + 1
    trainer.train()
    assert math.isfinite(losses_of(trainer)[0])


def test_sdxl_generated_pairs_carry_the_familys_micro_conditioning(tmp_path, sdxl_path):
    """The batch of generated SDXL pairs holds the family's conditioning of a generated image (its size, no crop)."""
    trainer = trainer_for(sdxl_path, tmp_path, max_steps=1)
    seen = record_batches(trainer)
    trainer.train()
    batch = seen[0]["inputs"]
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_original_size"].tolist() == [[32, 32]] * 2
        assert batch[f"{side}_crop_top_left"].tolist() == [[0, 0]] * 2
    assert math.isfinite(losses_of(trainer)[0])
