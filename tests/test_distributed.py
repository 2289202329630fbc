"""Data-parallel training through the Trainer's own DDP: 2 CPU processes (gloo) against one process with the same
global batch."""

import json
import os

import ddp_worker
import numpy as np
import pytest
from helpers import run_two_processes

from diffusion_dpo_trainer.testing import make_preference_dataset

METRICS = ("mse/chosen", "ref_mse/rejected", "rewards/chosen", "rewards/margins")


def two_process_run(tmp_path, sd_path, *flags):
    """8 pairs on disk; ddp_worker.py on 2 processes; returns (data_dir, reports dir)."""
    reports = tmp_path / "reports"
    data_dir = str(tmp_path / "pairs")
    make_preference_dataset(n=8, size=32).save_to_disk(data_dir)
    reports.mkdir()
    run_two_processes("ddp_worker.py", sd_path, data_dir, tmp_path / "ddp", reports, *flags, timeout=240)
    return data_dir, reports


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, sd_path):
    data_dir, reports = two_process_run(tmp_path, sd_path)
    ddp_worker.run(sd_path, data_dir, str(tmp_path / "single"), str(reports), single=True)

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((reports / "rank0-single.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1

    # Training completed on both ranks, and the logged metrics are the mean over both ranks' own values...
    logged = [h for h in ranks[0]["log_history"] if "rewards/chosen" in h]
    assert len(logged) == 3
    for step, entry in enumerate(logged):
        own = [r["local_metrics"][step] for r in ranks]
        for name in METRICS:
            assert entry[name] == pytest.approx((own[0][name] + own[1][name]) / 2, rel=1e-5, abs=1e-7)
    # ...of different draws: each rank has its own noise, so the ranks' own values differ.
    assert ranks[0]["local_metrics"][1]["mse/chosen"] != pytest.approx(ranks[1]["local_metrics"][1]["mse/chosen"])

    # ...and equal to the single-process run with the same global batch, as are the final weights.
    single_logged = [h for h in single["log_history"] if "rewards/chosen" in h]
    # Float tolerance: the averaged gradients round differently, which moves the errors by ~1e-7 after an update.
    mse_atol = 1e-6
    for ours, theirs in zip(logged, single_logged, strict=True):
        for name in (*METRICS, "loss"):
            atol = ddp_worker.BETA / 2 * mse_atol if name.startswith("rewards") or name == "loss" else mse_atol
            assert ours[name] == pytest.approx(theirs[name], abs=atol), name
    assert ranks[0]["lora"].keys() == single["lora"].keys()
    for key, value in single["lora"].items():
        np.testing.assert_allclose(ranks[0]["lora"][key], value, rtol=1e-4, atol=1e-6, err_msg=key)

    # Only the main process writes the model and its card.
    assert ranks[0]["saves"] >= 2 and ranks[0]["cards"] >= 2
    assert ranks[1]["saves"] == 0 and ranks[1]["cards"] == 0
    assert sorted(os.listdir(tmp_path / "ddp")) == ["README.md", "checkpoint-2", "checkpoint-3",
                                                    "pytorch_lora_weights.safetensors"]

    # With latent caching, the VAE encodes each image once over all ranks (the main process), not once per rank, and
    # training never calls it.
    assert (ranks[0]["vae_images"], ranks[1]["vae_images"]) == (2 * 8, 0)


def test_a_streamed_dataset_is_shared_between_processes(tmp_path, sd_path):
    """Each rank reads the stream and keeps its own share of every global batch, so 2 processes see what one
    process sees with the same global batch, and log the same losses."""
    data_dir, reports = two_process_run(tmp_path, sd_path, "--streamed")
    ddp_worker.run(sd_path, data_dir, str(tmp_path / "single"), str(reports), single=True, streamed=True)
    ranks = [json.loads((reports / f"rank{r}-streamed.json").read_text()) for r in (0, 1)]
    single = json.loads((reports / "rank0-single-streamed.json").read_text())
    for step in range(3):
        own = [ranks[0]["rows"][step], ranks[1]["rows"][step]]
        assert len(own[0]) == len(own[1]) == 1 and own[0] != own[1]
        assert sorted(own[0] + own[1]) == sorted(single["rows"][step])
    losses = [[h["loss"] for h in run["log_history"] if "loss" in h] for run in (ranks[0], single)]
    assert losses[0] == pytest.approx(losses[1], abs=ddp_worker.BETA / 2 * 1e-6)
