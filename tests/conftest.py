"""Shared fixtures: tiny offline pipelines built once per session and loaded by path, as users load real ones."""

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

from peft import LoraConfig  # noqa: E402

from diffusion_dpo_trainer import DiffusionDPOConfig  # noqa: E402
from diffusion_dpo_trainer.testing import (  # noqa: E402
    make_flux_pipeline,
    make_preference_dataset,
    make_sd3_pipeline,
    make_sd_pipeline,
    make_sdxl_pipeline,
)
from diffusion_dpo_trainer.testing_wan import build_tiny_wan_pipeline  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LN2 = math.log(2.0)  # the first DPO loss, while the policy still equals the reference


def make_args(tmp_path, **overrides):
    """A small CPU training config under tmp_path; each test overrides what it exercises."""
    values = {"output_dir": str(tmp_path / "out"), "resolution": 32, "per_device_train_batch_size": 2, "max_steps": 2,
              "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
              "dataloader_pin_memory": False}
    values.update(overrides)
    return DiffusionDPOConfig(**values)


def forbid(module, name):
    """Make `module` raise if it runs: proves a cached step never calls a frozen encoder."""
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called during training")

    module.forward = fail
    if hasattr(module, "encode"):
        module.encode = fail


def lora(**overrides):
    return LoraConfig(**{"r": 4, "lora_alpha": 4, "init_lora_weights": "gaussian", "target_modules": LORA_TARGETS,
                         **overrides})


@pytest.fixture(scope="session")
def sd_path(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="session")
def sd_v_path(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sdv") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def sdxl_path(tmp_path_factory):
    return make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="session")
def sd3_path(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="session")
def flux_path(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="session")
def wan_path(tmp_path_factory):
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe")


@pytest.fixture(scope="session")
def pairs():
    return make_preference_dataset(n=8, size=32)
