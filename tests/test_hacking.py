"""Reward-hacking signals on constructed images whose values are known, the alarm rule on scripted evaluation
sequences, and `RewardHackingCallback` in a real (tiny) training run."""

import json
import logging
import math

import numpy as np
import pytest
from helpers import lora, losses_of, make_args, run_two_processes
from PIL import Image
from transformers import TrainerControl, TrainerState

from diffusion_dpo_trainer import DiffusionDPOTrainer, RewardHackingCallback
from diffusion_dpo_trainer.hacking import (
    colour_entropy,
    diversity,
    grid_energy,
    hacking_alerts,
    hacking_signals,
    high_frequency_energy,
    saturation,
    within_prompt_diversity,
)

SAMPLING = dict(num_inference_steps=2, height=32, width=32)


def flat(colour, size=64):
    return Image.new("RGB", (size, size), colour)


def checkerboard(size=64, cell=1):
    y, x = np.indices((size, size))
    return Image.fromarray((((x // cell + y // cell) % 2) * 255).astype(np.uint8)).convert("RGB")


def noise(size=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- image statistics

def test_a_flat_image_has_no_entropy_no_detail_and_only_its_colours_saturation():
    grey = flat((128, 128, 128))
    assert colour_entropy(grey) == 0.0 and saturation(grey) == 0.0
    assert high_frequency_energy(grey) == 0.0 and grid_energy(grey) == 0.0
    assert saturation(flat((255, 0, 0))) == 1.0
    assert saturation(flat((200, 100, 100))) == pytest.approx(0.5)  # (200 - 100) / 200
    assert saturation(flat((0, 0, 0))) == 0.0  # black: no hue, saturation 0 by HSV's convention


def test_a_one_pixel_checkerboard_is_all_high_frequency_and_periodic():
    board = checkerboard()
    # All its energy is at the Nyquist corner (0.5, 0.5): radius 0.71 > 0.25, and 32 cycles are a multiple of 64/8.
    assert high_frequency_energy(board) == pytest.approx(1.0)
    assert grid_energy(board) == pytest.approx(1.0)
    assert colour_entropy(board) == pytest.approx(1.0)  # black and white, half each: one bit
    assert saturation(board) == 0.0


def test_grid_lines_every_8_px_are_caught_by_grid_energy_not_by_smoothness():
    array = np.full((64, 64, 3), 200, dtype=np.uint8)
    array[::8], array[:, ::8] = 40, 40  # one-pixel seams every 8 px, as between 8 px latent tiles
    lines = Image.fromarray(array)
    assert grid_energy(lines) == pytest.approx(1.0)  # the pattern tiles with period 8: nothing else in its spectrum
    wider = np.full((64, 64, 3), 200, dtype=np.uint8)
    wider[::16], wider[:, ::16] = 40, 40
    wider = Image.fromarray(wider)
    assert grid_energy(wider, period=16) == pytest.approx(1.0)
    assert grid_energy(wider, period=8) < 0.7  # its odd harmonics of 1/16 are no multiples of 1/8
    # One smooth cycle across the image: its energy is at 1/64 cycle per pixel (and its rounding error is tiny).
    wave = 127.5 + 127.5 * np.cos(2 * np.pi * np.arange(64) / 64)
    smooth = Image.fromarray(np.broadcast_to(wave[None, :, None], (64, 64, 3)).round().astype(np.uint8))
    assert high_frequency_energy(smooth) < 1e-4 and grid_energy(smooth) < 1e-4


def test_white_noise_spreads_its_energy_evenly():
    big = noise(256)
    assert colour_entropy(big) == pytest.approx(9.0, abs=0.02)  # 512 quantised colours, all about equally frequent
    # The share of the frequency square outside the disc of radius 1/4: 1 - pi/16.
    assert high_frequency_energy(big) == pytest.approx(1 - math.pi / 16, abs=0.01)
    # At 64 px: 7 columns and 7 rows of the 64 x 64 frequencies are multiples of 1/8 (847 of the 4095 non-DC bins).
    assert grid_energy(noise(64)) == pytest.approx(847 / 4095, abs=0.03)
    assert 0.3 < saturation(big) < 0.7


# ---------------------------------------------------------------- diversity

def test_diversity_is_the_mean_pairwise_rms_pixel_distance():
    black, white, grey = flat((0, 0, 0)), flat((255, 255, 255)), flat((128, 128, 128))
    assert diversity([black, black, black]) == 0.0
    assert diversity([black, white]) == pytest.approx(1.0)
    # pairs: black-white 1, black-grey 128/255, white-grey 127/255
    assert diversity([black, white, grey]) == pytest.approx((1 + 128 / 255 + 127 / 255) / 3)
    # Within prompt: "a" (black vs white: 1) and "b" (twice the same: 0) average to 0.5; across prompts is ignored.
    assert within_prompt_diversity([black, white, grey, grey], ["a", "a", "b", "b"]) == pytest.approx(0.5)
    signals = hacking_signals([black, white, grey, grey], ["a", "a", "b", "b"])
    assert signals["diversity"] == pytest.approx(0.5) and signals["colour_entropy"] == 0.0
    assert "diversity" not in hacking_signals([black, white], ["a", "b"])  # one image per prompt: no diversity
    with pytest.raises(ValueError, match="at least two images of one prompt"):
        within_prompt_diversity([black, white], ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        within_prompt_diversity([black, white], ["a"])


# ---------------------------------------------------------------- the alarm rule

@pytest.mark.parametrize("rewards, heldout, alarm", [
    ([1.0, 1.5, 2.0], [0.5, 0.45, 0.4], True),  # training reward up, held-out down: hacking
    ([1.0, 1.5, 2.0], [0.5, 0.6, 0.7], False),  # both up: learning
    ([1.0, 0.9, 0.8], [0.5, 0.4, 0.3], False),  # both down: a bad run, not hacking
    ([1.0, 2.0, 1.5], [0.5, 0.3, 0.5], False),  # the latest against the first: held-out recovered
])
def test_alarm_when_the_training_reward_rises_while_the_heldout_falls(rewards, heldout, alarm):
    history = [{"step": 10 * i, "reward": r, "heldout_reward": h} for i, (r, h) in enumerate(zip(rewards, heldout))]
    alerts = hacking_alerts(history)
    assert bool(alerts) == alarm
    if alarm:
        assert alerts == ["the training reward rose from 1 to 2 while the held-out reward fell from 0.5 to 0.4 "
                          "(steps 0 to 20)"]


def test_alarm_tolerances_and_missing_figures():
    history = [{"step": 0, "reward": 1.0, "heldout_reward": 0.5}, {"step": 5, "reward": 1.2, "heldout_reward": 0.45}]
    assert hacking_alerts(history, heldout_tolerance=0.1) == []  # a held-out dip within the tolerance
    assert len(hacking_alerts(history, heldout_tolerance=0.01)) == 1
    assert hacking_alerts(history[:1]) == []  # nothing to compare yet
    assert hacking_alerts([{"step": 0, "reward": 1.0}, {"step": 5, "reward": 3.0}]) == []  # no held-out reward
    assert hacking_alerts([{"step": 0, "reward": 1.0, "heldout_reward": math.nan},
                           {"step": 5, "reward": 3.0, "heldout_reward": 0.0}]) == []  # an unscored evaluation


@pytest.mark.parametrize("last, drop, alarm", [(0.19, 0.5, True), (0.21, 0.5, False), (0.35, 0.1, True),
                                               (0.37, 0.1, False), (0.0, 1.0, False)])
def test_alarm_when_diversity_collapses_past_the_threshold(last, drop, alarm):
    alerts = hacking_alerts([{"step": 0, "diversity": 0.4}, {"step": 9, "diversity": last}], diversity_drop=drop)
    assert bool(alerts) == alarm
    if alarm:
        assert alerts[0].startswith(f"within-prompt diversity collapsed from 0.4 to {last:.4g}")
    with pytest.raises(ValueError, match="diversity_drop must be a fraction"):
        hacking_alerts([], diversity_drop=1.5)


# ---------------------------------------------------------------- the callback in a training run

def test_callback_logs_the_signals_warns_and_stops_without_changing_training(tmp_path, sd_path, pairs, caplog):
    def args(path, **overrides):
        return make_args(path, **{"beta": 5000, "max_steps": 4, "learning_rate": 1e-2, **overrides})

    plain = DiffusionDPOTrainer(model=sd_path, args=args(tmp_path / "plain"), train_dataset=pairs, peft_config=lora())
    plain.train()

    trainer = DiffusionDPOTrainer(model=sd_path, args=args(tmp_path / "cb"), train_dataset=pairs, peft_config=lora())

    def reward(images, prompts):  # follows the step: up for the trained reward ...
        return [float(trainer.state.global_step)] * len(images)

    def heldout(prompts, completions, **kwargs):  # ... down for the held-out one (TRL's convention; None: unscored)
        return [-float(trainer.state.global_step), None] * (len(completions) // 2)

    callback = RewardHackingCallback(trainer, ["a red square", "a blue circle"], reward_fn=reward,
                                     heldout_reward_fn=heldout, seeds=[0, 1], eval_steps=2,
                                     stop_on_hacking=True, **SAMPLING)
    trainer.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo_trainer.evaluation"):
        trainer.train()

    assert [h["step"] for h in callback.history] == [0, 2]  # before training, then every 2 steps
    assert trainer.state.global_step == 2  # stopped at the first alarm (max_steps was 4)
    assert losses_of(trainer) == losses_of(plain)[:2]  # sampling in the middle of training changes nothing
    assert callback.alerts and "held-out reward fell from 0 to -2" in callback.alerts[0]
    assert "Possible reward hacking at step 2" in caplog.text and "Stopping training" in caplog.text
    logged = [h for h in trainer.state.log_history if "hacking/diversity" in h]
    assert [h["step"] for h in logged] == [0, 2]
    for entry in logged:
        assert {"hacking/reward", "hacking/heldout_reward", "hacking/colour_entropy", "hacking/saturation",
                "hacking/high_frequency_energy", "hacking/grid_energy"} <= entry.keys()
        assert 0.0 <= entry["hacking/diversity"] <= 1.0
    assert logged[1]["hacking/reward"] == 2.0 and logged[1]["hacking/heldout_reward"] == -2.0


def test_a_resumed_run_keeps_its_first_evaluation_and_reads_the_trainers_kl():
    callback = RewardHackingCallback(trainer=None, prompts=["a"], heldout_reward_fn=None)
    state = TrainerState(global_step=6, log_history=[
        {"step": 0, "hacking/diversity": 0.4, "hacking/reward": 1.0},
        {"step": 3, "loss": 0.6, "objective/scores": 1.7, "objective/kl": 0.02, "ratio/mean": 0.99},
        {"step": 6, "hacking/diversity": 0.3, "hacking/reward": 1.5},
    ])
    callback.on_train_begin(None, state, TrainerControl())  # no sampling: the history comes from the log
    assert callback.history == [{"step": 0, "diversity": 0.4, "reward": 1.0}, {"step": 6, "diversity": 0.3,
                                                                                "reward": 1.5}]
    # Without a reward function, the training reward is the one the trainer logged; KL and ratio figures come along.
    assert callback._from_logs(state) == {"reward": 1.7, "objective/kl": 0.02, "ratio/mean": 0.99}
    with pytest.raises(ValueError, match="eval_steps must be a positive"):
        RewardHackingCallback(trainer=None, prompts=["a"], eval_steps=0)


def test_evaluate_reports_diversity_and_image_statistics(tmp_path, sd_path):
    from diffusion_dpo_trainer.protocol import evaluate_protocol

    prompts = ["a red square", "a blue circle"]
    report = evaluate_protocol(sd_path, {"shapes": prompts}, [lambda images, prompts: [0.0] * len(images)],
                               tmp_path / "out", reference=sd_path, seeds=[0, 1], progress=False,
                               num_inference_steps=2, resolution=32)
    stats = report["image_statistics"]["shapes"]
    assert stats["base"] == stats["tuned"]  # the same model twice
    saved = [Image.open(tmp_path / "out" / "images" / "shapes" / "base" / f"{i:05d}_{s}.png")
             for i in range(2) for s in (0, 1)]
    expected = hacking_signals(saved, [p for p in prompts for _ in (0, 1)])
    assert stats["base"] == pytest.approx(expected)
    assert set(expected) == {"diversity", "colour_entropy", "saturation", "high_frequency_energy", "grid_energy"}


def test_every_process_stops_at_the_alarm(tmp_path, sd_path):
    """Only the main process evaluates; without the broadcast the other rank trains on and hangs in all-reduce."""
    run_two_processes("hacking_ddp_worker.py", sd_path, tmp_path / "ddp", tmp_path,
                      hang="a rank kept training after the main process stopped.")
    ranks = [json.loads((tmp_path / f"hacking-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"world": 2, "step": 2}, {"world": 2, "step": 2}]
