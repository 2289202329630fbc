"""Collators: canonical rows (decoded images, or cached latents) to the tensors `compute_loss` reads."""

import datasets
import numpy as np
import torch

from .caching import LATENT_STATS, cached_images
from .formats import IMAGE_COLUMNS, LABEL_COLUMN, ROW_COLUMN
from .transforms import load_image, paired_transform

#: A constant of the prompt-dropout draw's seed, so it is independent of other per-row draws (e.g. cached crops).
_PROMPT_DROPOUT_STREAM = 0x70D


def prompt_dropped(seed: int, row: int, proportion: float) -> bool:
    """Whether row `row`'s prompt is replaced by "" (prompt dropout, `proportion_empty_prompts`).

    One draw per (seed, row), from its own generator rather than the global one: it does not depend on batching,
    processes or what ran before, so a resumed run and a run from cached embeddings drop exactly the same rows.
    """
    if proportion <= 0:
        return False
    seed_sequence = np.random.SeedSequence([seed % 2**63, int(row), _PROMPT_DROPOUT_STREAM])
    return bool(np.random.default_rng(seed_sequence).random() < proportion)


class PreferenceCollator:
    """Turns canonical pair rows into the tensors `DiffusionDPOTrainer.compute_loss` reads.

    Rows with cached latents (see `caching.precompute_latents`) are passed through, with the pair's flip drawn here as
    for decoded images; `prompt_embeddings` (a callable, e.g. `caching.PromptEmbeddingCache`) adds the cached prompt
    embeddings as `batch["prompt_embeds"]`. With `proportion_empty_prompts`, a row's one prompt (shared by both images
    of a pair) becomes "" as `prompt_dropped(seed, row_index)` decides. With `draws` (a `reference_cache.RowDraws`,
    for `precompute_ref_errors`), each cached row's flip, timestep, noise and latent eps come from its own
    (seed, row, epoch) stream and are added as `timesteps`, `noise`, `latent_eps`, with the row's precomputed
    `ref_mse` for the epoch when present.
    """

    #: The image columns of a row, transformed together with one crop and flip.
    image_columns = IMAGE_COLUMNS

    def __init__(self, resolution: int, random_crop: bool = False, random_flip: bool = False, prompt_embeddings=None,
                 proportion_empty_prompts: float = 0.0, seed: int = 0):
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.prompt_embeddings = prompt_embeddings
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        self.draws = None

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """Shape of one transformed image, (C, H, W): what a latent cache sizes its columns from."""
        return (3, self.resolution, self.resolution)

    @property
    def transform_settings(self) -> tuple:
        """Settings of `transform` beyond resolution and crop, for a latent cache's fingerprint."""
        return ()

    def __call__(self, rows: list[dict]) -> dict:
        indices = [int(row.get(ROW_COLUMN, position)) for position, row in enumerate(rows)]
        batch = {"prompt": ["" if prompt_dropped(self.seed, index, self.proportion_empty_prompts) else row["prompt"]
                            for index, row in zip(indices, rows)]}
        stacked = {}
        for index, row in zip(indices, rows):
            if f"{self.image_columns[0]}_{LATENT_STATS[0]}" in row:
                draws = self._row_draws(row, index) if self.draws is not None else {"flip": None}
                flip = draws.pop("flip")
                for key, value in draws.items():
                    stacked.setdefault(key, []).append(torch.as_tensor(value))
                images = cached_images(row, index, self.image_columns, self.random_flip, flip)
            elif self.draws is not None:
                raise ValueError(f"Row {index}: precompute_ref_errors needs cached latents (precompute_latents=True).")
            else:
                images = self.transform(row, index, self.random_flip)
            for side, values in images.items():
                for key, value in values.items():
                    stacked.setdefault(self._batch_key(side, key), []).append(torch.as_tensor(value))
        batch.update({key: torch.stack(tensors) for key, tensors in stacked.items()})
        batch[ROW_COLUMN] = torch.tensor(indices)  # named by errors and warnings about the batch's rows
        if rows and LABEL_COLUMN in rows[0]:  # soft preference labels (`soft_labels`, `curriculum_stages`)
            batch[LABEL_COLUMN] = torch.tensor([float(row[LABEL_COLUMN]) for row in rows])
        if self.prompt_embeddings is not None:
            batch["prompt_embeds"] = self.prompt_embeddings(batch["prompt"])
        return batch

    def _row_draws(self, row: dict, index: int) -> dict:
        latent_shape = tuple(torch.as_tensor(row[f"{self.image_columns[0]}_{LATENT_STATS[0]}"]).shape)
        draws = self.draws(index, latent_shape, len(self.image_columns))
        if "ref_mse" in row:  # (epochs, images): this epoch's errors
            errors = torch.as_tensor(row["ref_mse"])
            if self.draws.epoch >= len(errors):
                raise ValueError(
                    f"Row {index}: the reference errors were precomputed for {len(errors)} epoch(s), but training "
                    f"reached epoch {self.draws.epoch}; the pass before training sizes them from max_steps or "
                    "num_train_epochs, which must not change afterwards."
                )
            draws["ref_mse"] = errors[self.draws.epoch]
        return draws

    def transform(self, row: dict, index: int, random_flip: bool, generator=None) -> dict:
        """Decode and transform a row's image columns together (one crop and flip); per column its pixels, original
        size and crop. Also what `caching.precompute_latents` encodes (without flip, with a per-row generator)."""
        images = [load_image(row[side], index, side) for side in self.image_columns]
        pixels, sizes, crops = paired_transform(images, self.resolution, self.random_crop, random_flip, generator)
        return {
            side: {"pixel_values": px, "original_size": size, "crop_top_left": crop}
            for side, px, size, crop in zip(self.image_columns, pixels, sizes, crops)
        }

    def _batch_key(self, side: str, key: str) -> str:
        return f"{side}_{key}"


class UnpairedCollator(PreferenceCollator):
    """Turns unpaired rows into tensors: one image per row, so each image gets its own crop and flip (the images are
    independent), and the batch keys carry no side prefix (`pixel_values`, `latent_mean`, ...) plus `label`.

    Cached rows (`caching.precompute_latents(dataset, family, UnpairedCollator(...))`) and `prompt_embeddings` are
    handled as in `PreferenceCollator`.
    """

    image_columns = ("image",)

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        batch["label"] = torch.tensor([bool(row["label"]) for row in rows], dtype=torch.bool)
        return batch

    def _batch_key(self, side: str, key: str) -> str:
        return key


def prepare_prompt_dataset(dataset, name: str = "train_dataset") -> datasets.Dataset:
    """An on-policy trainer's dataset: a `prompt` column of non-empty strings; the other columns go to the rewards."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`{name}` must be a datasets.Dataset of prompts, got {type(dataset).__name__}.")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"`{name}` has no 'prompt' column (found {dataset.column_names}); on-policy training samples "
                         "its images from the prompts.")
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: there are no prompts to sample.")
    for row, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"Row {row}, column 'prompt': expected a non-empty string, got {prompt!r}.")
    return dataset


class PromptCollator:
    """Rows of a prompt dataset as lists per column (the prompts, and the columns the rewards receive).

    It has no image columns; `prompt_embeddings` (set by `precompute_text_embeddings`) is looked up for the generated
    pairs' prompts, by the trainer, and holds `extra_prompts` too (the trainer adds "", guided sampling's negative).
    """

    image_columns = ()
    prompt_embeddings = None
    extra_prompts: tuple[str, ...] = ()

    def __call__(self, rows: list[dict]) -> dict[str, list]:
        return {key: [row[key] for row in rows] for key in rows[0]}
