"""Diffusion-DPO for diffusers text-to-image models, with TRL's trainer API.

The public names are imported on first use (PEP 562 `__getattr__`): `import diffusion_dpo_trainer`, and so the
command's `--help` and `--version`, load no torch, diffusers or transformers (seconds of imports, and their noise).
"""

import importlib

from . import quiet
from ._version import __version__ as __version__  # re-exported: `diffusion_dpo_trainer.__version__`

quiet.install()

#: Public name -> the module that defines it.
_MODULES = {
    "DiffusionDPOConfig": "config",
    "DiffusionDPOTrainer": "trainer",
    "DiffusionGRPOConfig": "grpo_config",
    "DiffusionGRPOTrainer": "grpo_trainer",
    "DiffusionNFTConfig": "nft_config",
    "DiffusionNFTTrainer": "nft_trainer",
    "DiffusionOnlineDPOConfig": "online_config",
    "DiffusionOnlineDPOTrainer": "online_trainer",
    "PreferenceCollator": "collators",
    "UnpairedCollator": "collators",
    "VideoPreferenceCollator": "video_data",
    "VideoUnpairedCollator": "video_data",
    "load_preference_folder": "formats",
    "prepare_preference_dataset": "formats",
    "prepare_unpaired_dataset": "formats",
    "to_preference_pairs": "formats",
    "CLIPScore": "rewards",
    "PickScore": "rewards",
    "RewardEvaluationCallback": "evaluation",
    "RewardHackingCallback": "evaluation",
    "build_preference_pairs": "feedback",
    "evaluate_protocol": "protocol",
    "evaluate_win_rate": "evaluation",
    "frame_averaged": "rewards",
    "load_reward": "rewards",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
