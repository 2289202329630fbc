"""The on-policy configs share one base (`OnPolicyConfig`) without changing a public name or default: each fresh
config's fields beyond `DiffusionDPOConfig`'s, and the defaults it changes, are what they were before the base existed
(written from main at cec28f5), and the shared validation speaks for each config alike."""

import pytest

from diffusion_dpo_trainer.config import DiffusionDPOConfig
from diffusion_dpo_trainer.grpo_config import DiffusionGRPOConfig
from diffusion_dpo_trainer.nft_config import DiffusionNFTConfig
from diffusion_dpo_trainer.online_config import DiffusionOnlineDPOConfig

SHARED = {"generation_batch_size": None, "num_iterations": 1, "reward_weights": None}
SYNC = {"sync_ref_model": False, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512}
#: Per config: its own fields and the base fields whose default it changes, as on main before the shared base.
BEFORE = {
    DiffusionOnlineDPOConfig: {
        **SHARED, **SYNC, "num_images_per_prompt": 4, "num_inference_steps": 20, "pair_strategy": "best_vs_worst",
        "min_score_gap": 0.0, "no_pair_patience": None},
    DiffusionGRPOConfig: {
        **SHARED, **SYNC, "beta": 0.04, "guidance_scale": 4.5, "num_generations": 8, "epsilon": 0.0001,
        "epsilon_high": None, "scale_rewards": "group", "multi_objective_aggregation": "sum_then_normalize",
        "advantage_clip": 5.0, "dynamics": None, "noise_level": None, "num_inference_steps": 10,
        "eval_num_inference_steps": 40, "timestep_fraction": 0.99, "sde_window_size": 0, "sde_window_mode": "fixed",
        "sde_window_start": 0, "sde_window_stride": 1, "sde_window_shift_every": 25,
        "init_same_noise": False},  # added after the base (DanceGRPO's option), off: today's sampling
    DiffusionNFTConfig: {
        **SHARED, "beta": 0.0001, "guidance_scale": 1.0, "nft_beta": 1.0, "num_generations": 4,
        "num_inference_steps": 10, "scale_rewards": "batch", "multi_objective_aggregation": "sum_then_normalize",
        "advantage_clip": 5.0, "timestep_fraction": 0.99, "nft_timesteps": "schedule", "ema_decay_type": 1,
        "ema_flat": None, "ema_uprate": None, "ema_uphold": None},
}


@pytest.fixture(scope="module")
def base_defaults():
    return DiffusionDPOConfig(output_dir="out").to_dict()


@pytest.mark.parametrize("config_class", list(BEFORE), ids=lambda c: c.__name__)
def test_public_names_and_defaults_are_unchanged(config_class, base_defaults):
    values = config_class(output_dir="out").to_dict()
    assert set(values) == set(base_defaults) | set(BEFORE[config_class])
    changed = {k: v for k, v in values.items() if k not in base_defaults or base_defaults[k] != v}
    assert changed == BEFORE[config_class]


@pytest.mark.parametrize("config_class", list(BEFORE), ids=lambda c: c.__name__)
@pytest.mark.parametrize("field, value, message", [
    ("num_inference_steps", 0, "num_inference_steps must be >= 1"),
    ("num_iterations", 0, "num_iterations must be >= 1"),
    ("generation_batch_size", 0, "generation_batch_size must be >= 1 or None"),
])
def test_the_shared_fields_are_checked_alike(config_class, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_class(output_dir="out", **{field: value})
