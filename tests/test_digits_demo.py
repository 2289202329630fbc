"""The digits demo's --quick mode runs end to end, on the epsilon and on the flow base, and writes a well-formed report
(its win rate needs the full run)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "examples" / "digits_alignment.py"


def is_fraction(value):
    return isinstance(value, float) and 0.0 <= value <= 1.0


def quick_on_policy_run(tmp_path, mode: str):
    """`--quick --<mode> --seed 1`: (report, stdout), after the checks every on-policy mode shares: 4 steps with new
    samples every 2, i.e. 2 rollouts of dpo_batch_size prompts x images_per_group images; the reward model's score
    logged at steps 1 and 3; the time split; the LoRA loads into the saved base pipeline."""
    out = tmp_path / f"digits-{mode}"
    done = subprocess.run([sys.executable, str(DEMO), "--quick", f"--{mode}", "--output-dir", str(out), "--seed", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert report["mode"] == mode and is_fraction(report["win_rate"])
    assert report["images_sampled"] == 2 * settings["dpo_batch_size"] * settings["images_per_group"]
    assert [step for step, _ in report["reward_model_score_while_training"]] == [1, 3]
    assert 0 < report["sampling_s"] < report["timings_s"]["dpo_training"]
    pipe = StableDiffusionPipeline.from_pretrained(out / "base-pipeline")
    pipe.load_lora_weights(out / "dpo-lora")
    return report, done.stdout


def test_quick_run_writes_a_well_formed_report(tmp_path):
    out = tmp_path / "digits-dpo"
    # The example's own command line, as a user runs it (examples are scripts, not library modules).
    done = subprocess.run([sys.executable, str(DEMO), "--quick", "--output-dir", str(out), "--seed", "1",
                           "--groups-per-digit", "3", "--dpo-option", "beta=4000", "--setting", "eval_seeds=3"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    report = json.loads((out / "report.json").read_text())
    # --groups-per-digit sets the offline sampling budget (QUICK has 2 groups): 3 groups x 10 digits, one pair each.
    assert report["settings"]["groups_per_digit"] == 3
    # --dpo-option beta=... sets DPO's strength (a Settings field, as in digits_sweep.py) rather than clashing with it.
    assert report["settings"]["beta"] == 4000.0 and report["dpo_options"] == {"beta": 4000.0}
    assert report["settings"]["eval_seeds"] == 3  # --setting overrides the demo's settings (QUICK has 4)
    assert report["images_sampled"] == 3 * 10 * report["settings"]["images_per_group"]
    assert 0 < report["num_pairs"] <= 30
    assert f"judged win rate of DPO over base: {report['win_rate']:.1%}" in done.stdout  # the summary is the report's
    assert is_fraction(report["win_rate"])
    n = report["num_comparisons"]
    assert n == 10 * report["settings"]["eval_seeds"]
    assert report["wins"] + report["losses"] + report["ties"] == n
    assert math.isclose(report["win_rate"], (report["wins"] + 0.5 * report["ties"]) / n)
    assert is_fraction(report["reward_model_win_rate"])
    for model in ("base", "dpo"):
        stats = report["judge"][model]
        assert is_fraction(stats["mean_judge_score"]) and is_fraction(stats["accuracy"])
        assert sorted(stats["per_digit_accuracy"]) == [str(d) for d in range(10)]
        assert all(is_fraction(v) for v in stats["per_digit_accuracy"].values())
        assert math.isclose(stats["accuracy"], np.mean(list(stats["per_digit_accuracy"].values())))
        assert isinstance(stats["diversity"], float) and stats["diversity"] >= 0.0
    assert report["seed"] == 1 and report["quick"] is True
    signals = report["reward_hacking"]["signals"]  # RewardHackingCallback: before training, then every 2 steps
    assert [s["step"] for s in signals] == [0, 2, 4]
    assert all(is_fraction(s["reward"]) and is_fraction(s["heldout_reward"]) and is_fraction(s["diversity"])
               for s in signals)
    assert isinstance(report["reward_hacking"]["alerts"], list)
    assert all(value >= 0 for value in report["timings_s"].values())

    for name in ("samples.png", "training_curves.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    # The saved base pipeline and LoRA load the way a user loads them.
    pipe = StableDiffusionPipeline.from_pretrained(out / "base-pipeline")
    pipe.load_lora_weights(out / "dpo-lora")
    assert os.path.isfile(out / "dpo-lora" / "README.md")


def test_groups_per_digit_is_refused_with_online():
    done = subprocess.run([sys.executable, str(DEMO), "--online", "--groups-per-digit", "96"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "offline DPO only" in done.stderr


def test_an_unknown_dpo_option_is_refused():
    done = subprocess.run([sys.executable, str(DEMO), "--quick", "--dpo-option", "winner_preserving=0.9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "winner_preserving_mu" in done.stderr


def test_a_bad_setting_is_refused(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(DEMO.parent))
    spec = importlib.util.spec_from_file_location("digits_alignment", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for setting, expected in (("eval_seed=3", "eval_seeds"), ("dpo_steps=1.5", "dpo_steps takes int values"),
                              ("base=flow", "--base"), ("grpo_init_same_noise=yes", "0/1 or true/false")):
        with pytest.raises(SystemExit) as exit_:
            demo.parse_args(["--quick", "--setting", setting])
        assert exit_.value.code == 2 and expected in capsys.readouterr().err, setting


def test_quick_online_run_reports_its_sampling_budget(tmp_path):
    report, _ = quick_on_policy_run(tmp_path, "online")
    assert is_fraction(report["no_pair_fraction"]) and report["mean_pair_reward_gap"] > 0


def test_quick_grpo_run_reports_its_sampling_budget_and_time_split(tmp_path):
    report, stdout = quick_on_policy_run(tmp_path, "grpo")
    assert "GRPO; images sampled" in stdout
    assert is_fraction(report["frac_reward_zero_std"])
    assert 0 < report["training_s"] < report["timings_s"]["dpo_training"]


def test_online_and_grpo_are_refused_together():
    done = subprocess.run([sys.executable, str(DEMO), "--online", "--grpo"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "choose one" in done.stderr


def test_quick_nft_run_reports_its_sampling_budget_and_time_split(tmp_path):
    report, _ = quick_on_policy_run(tmp_path, "nft")
    assert all(is_fraction(score) for _, score in report["reward_model_score_while_training"])
    assert 0 < report["training_s"] < report["timings_s"]["dpo_training"] and report["rewards_s"] > 0


def test_grpo_and_nft_are_refused_together():
    done = subprocess.run([sys.executable, str(DEMO), "--grpo", "--nft"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "choose one" in done.stderr
def test_quick_run_on_the_flow_base(tmp_path):
    out = tmp_path / "digits-flow"
    done = subprocess.run([sys.executable, str(DEMO), "--quick", "--base", "flow", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["base"] == "flow" and report["mode"] == "offline"
    assert is_fraction(report["win_rate"]) and is_fraction(report["judge"]["base"]["accuracy"])
    # The base is an ordinary SD3 pipeline with a flow-matching sampler, and the DPO LoRA loads into it and acts.
    pipe = DiffusionPipeline.from_pretrained(out / "base-pipeline")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    call = {"prompt": "a handwritten digit 3", "num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "pt"}
    base = pipe(generator=torch.Generator().manual_seed(0), **call).images
    pipe.load_lora_weights(out / "dpo-lora")
    tuned = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert base.shape == (1, 3, 16, 16) and not torch.equal(base, tuned)
