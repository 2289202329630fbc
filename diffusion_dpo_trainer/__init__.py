"""Diffusion-DPO for diffusers text-to-image models, with TRL's trainer API."""

from ._version import __version__ as __version__  # re-exported: `diffusion_dpo_trainer.__version__`
from .collators import PreferenceCollator, UnpairedCollator
from .config import DiffusionDPOConfig
from .evaluation import RewardEvaluationCallback, RewardHackingCallback, evaluate_win_rate
from .feedback import build_preference_pairs
from .formats import load_preference_folder, prepare_preference_dataset, prepare_unpaired_dataset, to_preference_pairs
from .online_config import DiffusionOnlineDPOConfig
from .online_trainer import DiffusionOnlineDPOTrainer
from .protocol import evaluate_protocol
from .rewards import CLIPScore, PickScore, frame_averaged, load_reward
from .trainer import DiffusionDPOTrainer
from .video_data import VideoPreferenceCollator, VideoUnpairedCollator

__all__ = [
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionOnlineDPOConfig",
    "DiffusionOnlineDPOTrainer",
    "PreferenceCollator",
    "UnpairedCollator",
    "VideoPreferenceCollator",
    "VideoUnpairedCollator",
    "load_preference_folder",
    "prepare_preference_dataset",
    "prepare_unpaired_dataset",
    "to_preference_pairs",
    "CLIPScore",
    "PickScore",
    "RewardEvaluationCallback",
    "RewardHackingCallback",
    "build_preference_pairs",
    "evaluate_protocol",
    "evaluate_win_rate",
    "frame_averaged",
    "load_reward",
]
