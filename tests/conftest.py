"""Shared fixtures: tiny offline pipelines built once per session and loaded by path, as users load real ones.
Helpers (configs, metrics, recorders) are in helpers.py."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

from diffusion_dpo_trainer.testing import (  # noqa: E402
    make_flux_pipeline,
    make_preference_dataset,
    make_sd3_pipeline,
    make_sd_pipeline,
    make_sdxl_pipeline,
)
from diffusion_dpo_trainer.testing.wan import build_tiny_wan_pipeline  # noqa: E402


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


@pytest.fixture
def trainers(monkeypatch):
    """The trainers the CLI builds, to look at their log history and datasets."""
    import diffusion_dpo_trainer.trainer as trainer_module

    created = []

    class Recording(trainer_module.DiffusionDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(trainer_module, "DiffusionDPOTrainer", Recording)
    return created
