"""Sharded training for real: `accelerate launch` with the shipped FSDP2 and DeepSpeed ZeRO configs, 2 CPU processes
(gloo), against one process with the same global batch. One launch per config runs every case it covers
(sharded_worker.py), so the suite pays the start-up once per config."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from safetensors.numpy import load_file

import sharded_worker
from diffusion_dpo_trainer.testing import make_preference_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(HERE), "examples", "accelerate")
METRICS = ("loss", "mse/chosen", "mse/rejected", "ref_mse/chosen", "rewards/chosen", "rewards/margins")
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pairs") / "pairs")
    make_preference_dataset(n=8, size=32).save_to_disk(path)
    return path


def launch(work_dir, config: str, sd_path: str, data_dir: str, *runs: str):
    """`accelerate launch --config_file examples/accelerate/<config>.yaml` on 2 CPU processes, fp32."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(CONFIG_DIR, f"{config}.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(free_port()), os.path.join(HERE, "sharded_worker.py"), sd_path, data_dir,
               str(work_dir), *runs]
    (work_dir / "reports").mkdir(parents=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return work_dir


def reports(work_dir, name):
    return [json.loads((work_dir / "reports" / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def single(tmp_path_factory, sd_path, data_dir):
    """The one-process runs (LoRA and full fine-tune) every sharded run is compared with."""
    work_dir = tmp_path_factory.mktemp("single")
    (work_dir / "reports").mkdir()
    for name in ("lora", "full"):
        sharded_worker.run(sd_path, data_dir, str(work_dir / name), str(work_dir / "reports"), name,
                           lora=name == "lora", single=True)
    return work_dir


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, sd_path, data_dir):
    return launch(tmp_path_factory.mktemp("fsdp"), "fsdp", sd_path, data_dir, "lora", "full", "full-resumed")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, sd_path, data_dir):
    pytest.importorskip("deepspeed", reason='DeepSpeed tests need pip install "diffusion-dpo-trainer[deepspeed]"')
    return launch(tmp_path_factory.mktemp("zero2"), "deepspeed_zero2", sd_path, data_dir, "lora")


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, sd_path, data_dir):
    pytest.importorskip("deepspeed", reason='DeepSpeed tests need pip install "diffusion-dpo-trainer[deepspeed]"')
    return launch(tmp_path_factory.mktemp("zero3"), "deepspeed_zero3", sd_path, data_dir, "full")


def assert_matches_one_process(work_dir, single_dir, name):
    """Logged metrics are the mean over both ranks' own values and equal the one-process run's, step by step, and
    so are the weights written to disk."""
    ranks = reports(work_dir, name)
    (one,) = [json.loads((single_dir / "reports" / f"{name}-rank0.json").read_text())]
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    logged = [h for h in ranks[0]["log_history"] if "rewards/chosen" in h]
    expected = [h for h in one["log_history"] if "rewards/chosen" in h]
    assert len(logged) == len(expected) == sharded_worker.STEPS
    for step, (ours, theirs) in enumerate(zip(logged, expected)):
        own = [r["local_metrics"][step] for r in ranks]
        assert own[0]["mse/chosen"] != pytest.approx(own[1]["mse/chosen"])  # each rank its own pairs and noise
        for metric in METRICS:
            # Float tolerance: the sharded reductions round differently, which moves the errors by ~1e-7.
            atol = sharded_worker.BETA / 2 * 1e-6 if metric == "loss" or metric.startswith("rewards") else 1e-6
            if metric != "loss":
                assert ours[metric] == pytest.approx((own[0][metric] + own[1][metric]) / 2, rel=1e-5, abs=1e-7)
            assert ours[metric] == pytest.approx(theirs[metric], abs=atol), (step, metric)
    weights = LORA_FILE if name == "lora" else UNET_FILE
    assert_same_weights(work_dir / name / weights, single_dir / name / weights)
    return ranks


def assert_same_weights(path, expected_path):
    ours, theirs = load_file(str(path)), load_file(str(expected_path))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def assert_sharded(held, kind):
    """This process holds about half of the model (each parameter split over 2 ranks), in the backend's format."""
    assert held["kinds"] == [kind], held
    assert held["local"] < 0.55 * held["total"], held


def assert_written_once_and_complete(work_dir, ranks, sd_path):
    """Only the main process writes (checkpoints and the final save), and the denoiser it writes is complete: every
    tensor of the original, loadable with `from_pretrained`."""
    assert ranks[0]["writes"] == 3 and ranks[1]["writes"] == 0  # checkpoint-2, checkpoint-3, save_model
    trained = UNet2DConditionModel.from_pretrained(str(work_dir / "full"), subfolder="unet")
    original = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    assert trained.state_dict().keys() == original.state_dict().keys()
    assert all(t.shape == o.shape for t, o in zip(trained.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize("name", ["lora", "full"])
def test_fsdp_matches_one_process_with_the_same_global_batch(fsdp, single, name):
    ranks = assert_matches_one_process(fsdp, single, name)
    # FSDP really ran: the policy is sharded (accelerate falls back to DDP silently, which would also match).
    for rank in ranks:
        assert rank["distributed_type"] == "FSDP"
        assert_sharded(rank["policy"], "dtensor")


def test_fsdp_shards_the_frozen_reference_of_a_full_fine_tune(fsdp):
    for rank in reports(fsdp, "full"):
        assert_sharded(rank["reference"], "dtensor")
    assert all(rank["reference"] is None for rank in reports(fsdp, "lora"))  # the adapter-disabled policy


def test_fsdp_full_fine_tune_saves_a_complete_denoiser_once(fsdp, sd_path):
    assert_written_once_and_complete(fsdp, reports(fsdp, "full"), sd_path)


def test_fsdp_resume_equals_an_uninterrupted_run(fsdp):
    resumed = reports(fsdp, "full-resumed")[0]
    assert len(resumed["local_metrics"]) == 1  # only the step after checkpoint-2 was trained again
    step3 = [next(h for h in run["log_history"] if h.get("step") == 3 and "rewards/chosen" in h)
             for run in (resumed, reports(fsdp, "full")[0])]
    for metric in METRICS:
        assert step3[0][metric] == pytest.approx(step3[1][metric], rel=1e-6, abs=1e-9), metric
    assert_same_weights(fsdp / "full-resumed" / UNET_FILE, fsdp / "full" / UNET_FILE)


def test_deepspeed_zero2_lora_matches_one_process(zero2, single):
    for rank in assert_matches_one_process(zero2, single, "lora"):
        assert rank["distributed_type"] == "DEEPSPEED"


def test_deepspeed_zero3_full_fine_tune_matches_one_process(zero3, single, sd_path):
    ranks = assert_matches_one_process(zero3, single, "full")
    for rank in ranks:
        assert rank["distributed_type"] == "DEEPSPEED"
        assert_sharded(rank["policy"], "zero3")
        assert_sharded(rank["reference"], "zero3")
    assert_written_once_and_complete(zero3, ranks, sd_path)
