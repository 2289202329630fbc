"""The data layer's public names under their original import path (`diffusion_dpo_trainer.data`).

The layer is three modules, one idea each: `formats` (dataset formats -> canonical rows), `transforms` (decoding and
the paired transform) and `collators` (rows -> tensors); the latent cache's layout lives in `caching`.
"""

from .caching import FLIPPED, LATENT_STATS
from .collators import PreferenceCollator, UnpairedCollator
from .formats import (
    FOLDER_KEYS,
    FOLDER_METADATA,
    IMAGE_COLUMNS,
    PAIR_COLUMNS,
    PICKAPIC_COLUMNS,
    ROW_COLUMN,
    UNPAIRED_COLUMNS,
    load_preference_folder,
    prepare_preference_dataset,
    prepare_unpaired_dataset,
    to_preference_pairs,
)
from .transforms import flipped_crop_top_left, load_image, paired_transform

__all__ = [
    "FLIPPED",
    "FOLDER_KEYS",
    "FOLDER_METADATA",
    "IMAGE_COLUMNS",
    "LATENT_STATS",
    "PAIR_COLUMNS",
    "PICKAPIC_COLUMNS",
    "ROW_COLUMN",
    "UNPAIRED_COLUMNS",
    "PreferenceCollator",
    "UnpairedCollator",
    "flipped_crop_top_left",
    "load_image",
    "load_preference_folder",
    "paired_transform",
    "prepare_preference_dataset",
    "prepare_unpaired_dataset",
    "to_preference_pairs",
]
