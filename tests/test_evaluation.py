"""Win-rate evaluation: the tie rule, the adapter-disabled reference, and the training callback's logs."""

import glob

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import LORA_TARGETS, lora, losses_of, make_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.evaluation import RewardEvaluationCallback, compare_rewards, evaluate_win_rate

SAMPLING = dict(num_inference_steps=2, height=32, width=32)
PROMPTS = ["a red square", "a blue circle"]


def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def args_for(tmp_path, **overrides):
    return make_args(tmp_path, **{"beta": 5000, "max_steps": 4, "learning_rate": 1e-2, **overrides})


def test_ties_count_half_a_win():
    result = compare_rewards([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0])
    assert result["outcomes"] == ["win", "loss", "tie", "win"]
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 1)
    assert result["win_rate"] == (2 + 0.5 * 1) / 4
    assert result["reward"] == 2.0 and result["reward_reference"] == 1.25
    # Differences up to the margin are ties: only 3 vs 1 (diff 2) and 2 vs 0 (diff 2) stay wins.
    assert compare_rewards([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], tie_margin=1.0)["outcomes"] == [
        "win", "tie", "tie", "win"]


def test_a_non_finite_reward_is_an_error_not_a_tie(sd_path):
    """NaN compares as neither better nor worse: it would count as a tie (half a win). It is an error instead."""
    def broken(images, prompts):
        return [float("nan") if p == "a blue circle" else 1.0 for p in prompts]

    with pytest.raises(ValueError, match=r"'broken' returned nan for image 1 \(prompt 'a blue circle'\)"):
        evaluate_win_rate(sd_path, sd_path, PROMPTS, broken, seeds=[0], progress=False, **SAMPLING)


def test_policy_equal_to_reference_is_all_ties(sd_path):
    pipe = DiffusionPipeline.from_pretrained(sd_path)
    result = evaluate_win_rate(pipe, sd_path, PROMPTS, brightness, seeds=[0, 1], progress=False, **SAMPLING)
    assert result["num_comparisons"] == 4
    assert (result["wins"], result["losses"], result["ties"]) == (0, 0, 4)
    assert result["win_rate"] == 0.5
    assert result["reward"] == result["reward_reference"]
    assert [(c["prompt"], c["seed"]) for c in result["comparisons"]] == [
        ("a red square", 0), ("a red square", 1), ("a blue circle", 0), ("a blue circle", 1)]


def test_reference_none_is_the_adapter_disabled_policy(sd_path):
    base = DiffusionPipeline.from_pretrained(sd_path)
    pipe = DiffusionPipeline.from_pretrained(sd_path)
    pipe.unet.add_adapter(lora())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    result = evaluate_win_rate(pipe, None, PROMPTS, brightness, seeds=[3], return_images=True, progress=False,
                               **SAMPLING)
    expected = evaluate_win_rate(base, base, PROMPTS, brightness, seeds=[3], return_images=True, progress=False,
                                 **SAMPLING)
    for got, want in zip(result["reference_images"], expected["images"]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(result["images"][0]), np.asarray(expected["images"][0]))
    assert result["reward_reference"] == expected["reward"]
    # Afterwards the adapter is active again.
    again = evaluate_win_rate(pipe, base, PROMPTS[:1], brightness, seeds=[3], return_images=True, progress=False,
                              **SAMPLING)
    np.testing.assert_array_equal(np.asarray(again["images"][0]), np.asarray(result["images"][0]))


def test_a_standalone_evaluation_in_the_middle_of_training_leaves_the_trainer_working(tmp_path, sd_path, pairs):
    """`evaluate_win_rate(trainer.pipeline, None, ...)` from a callback builds a family for the pipeline; that must not
    reset accelerate's process state under the running Trainer."""

    class EvaluateEveryStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            evaluate_win_rate(trainer.pipeline, None, PROMPTS[:1], brightness, seeds=[0], progress=False, **SAMPLING)

    trainer = DiffusionDPOTrainer(model=sd_path, args=args_for(tmp_path, max_steps=2), train_dataset=pairs,
                                  peft_config=lora(), callbacks=[EvaluateEveryStep()])
    trainer.train()
    assert len(losses_of(trainer)) == 2
    assert trainer.accelerator.device.type == "cpu"


def test_callback_logs_metrics_and_images_without_changing_training(tmp_path, sd_path, pairs):
    reference_run = DiffusionDPOTrainer(model=sd_path, args=args_for(tmp_path / "plain"), train_dataset=pairs,
                                        peft_config=lora())
    reference_run.train()

    args = args_for(tmp_path / "cb", report_to="tensorboard")
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())
    callback = RewardEvaluationCallback(trainer, PROMPTS, brightness, seeds=[0, 1], eval_steps=2, **SAMPLING)
    trainer.add_callback(callback)
    trainer.train()

    # Sampling in the middle of training changes nothing: same losses, step for step.
    assert losses_of(trainer) == losses_of(reference_run)
    evals = [h for h in trainer.state.log_history if "eval_win_rate" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert 0.0 <= h["eval_win_rate"] <= 1.0
        assert {"eval_reward", "eval_reward_reference"} <= h.keys()
    # The reference (adapter off) does not move; the policy does.
    assert evals[0]["eval_reward_reference"] == evals[1]["eval_reward_reference"]
    assert evals[1]["eval_reward"] != evals[1]["eval_reward_reference"]
    # The callback's logs do not swallow the training metrics of the same step.
    assert all("rewards/accuracies" in h for h in trainer.state.log_history if "loss" in h)
    assert trainer.model.training

    events = EventAccumulator(glob.glob(f"{args.output_dir}/runs/*")[0], size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/win_rate")] == [2, 4]
    assert "eval/reward" in events.Tags()["scalars"] and "eval/reward_reference" in events.Tags()["scalars"]
    images = events.Images("eval/samples")
    assert [e.step for e in images] == [2, 4]
    # Two rows (reference, policy) of one 32 px image per (prompt, seed).
    assert (images[0].height, images[0].width) == (64, 4 * 32)


def test_callback_on_a_full_finetune_uses_the_frozen_copy_and_runs_on_evaluate(tmp_path, sd_path, pairs):
    trainer = DiffusionDPOTrainer(model=sd_path, args=args_for(tmp_path, max_steps=2), train_dataset=pairs,
                                  eval_dataset=pairs.select(range(2)))
    callback = RewardEvaluationCallback(trainer, PROMPTS[:1], brightness, seeds=[0], **SAMPLING)
    trainer.add_callback(callback)
    policy = trainer.pipeline.unet
    before = callback.evaluate()
    assert before["win_rate"] == 0.5  # nothing trained yet: policy == frozen copy
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    logged = [h for h in trainer.state.log_history if "eval_win_rate" in h]
    assert len(logged) == 1 and logged[0]["step"] == 2
    assert logged[0]["eval_reward_reference"] == pytest.approx(before["reward_reference"])
    assert logged[0]["eval_reward"] != logged[0]["eval_reward_reference"]
    assert trainer.pipeline.unet is policy  # the reference was swapped out again


def test_saved_lora_with_conv_targets_reproduces_the_trained_samples(tmp_path, sd_path, pairs):
    """What the win rate of a reloaded LoRA measures is what was trained, whatever the adapter targets."""
    peft_config = lora(target_modules=LORA_TARGETS + ["conv1", "conv2", "proj_in", "proj_out"])
    trainer = DiffusionDPOTrainer(model=sd_path, args=args_for(tmp_path, max_steps=2), train_dataset=pairs,
                                  peft_config=peft_config)
    trainer.train()
    trainer.save_model()
    reloaded = DiffusionPipeline.from_pretrained(sd_path)
    reloaded.load_lora_weights(trainer.args.output_dir)
    trained = evaluate_win_rate(trainer.pipeline, None, PROMPTS, brightness, seeds=[0], return_images=True,
                                progress=False, **SAMPLING)
    loaded = evaluate_win_rate(reloaded, None, PROMPTS, brightness, seeds=[0], return_images=True, progress=False,
                               **SAMPLING)
    assert trained["reward"] != trained["reward_reference"]
    for got, want in zip(loaded["images"], trained["images"]):
        np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), atol=1)
