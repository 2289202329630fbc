"""Precomputed reference errors (`precompute_ref_errors=True`, TRL's `precompute_ref_log_probs` for diffusion).

Diffusion-DPO's reference term is the reference denoiser's error on the SAME noisy latents the policy sees, and those
depend on random draws: the latent sample (mean + std * eps), the noise, the timestep and the flip. Here every row (a
pair, or one unpaired image) draws them in every epoch from its own generator, seeded by (seed, row, epoch), so a
pass before training and training itself make exactly the same draws whatever the batching, shuffling, process count
or resume point. Crops are already fixed per row by the latent cache, which this option requires.

The pass stores the errors with `datasets` (a `ref_mse` column of shape (epochs, images per row)) under a fingerprint of
everything they depend on, so a beta or learning-rate sweep with the same seed computes them once; training then
reads them and never runs a reference. The trade: each pair sees one fixed noise and timestep per epoch, not a fresh
draw every time it is visited (which is what it sees anyway in a single-epoch run).
"""

import datasets
import torch
from datasets.fingerprint import Hasher
from transformers import TrainerCallback

from .caching import CACHE_VERSION, module_fingerprint, row_generator

#: Column holding a row's reference errors, shape (epochs, images per row): chosen then rejected for a pair.
REF_MSE = "ref_mse"
#: The key that separates these draws' generator from the latent cache's crop generator (seed, row).
_DRAW_STREAM = 1


class RowDraws:
    """The random draws of one row in the current epoch (`epoch` is set by `DrawEpochCallback`; 0 in evaluation)."""

    def __init__(self, seed: int, sample_timesteps, random_flip: bool):
        self.seed = seed
        self.sample_timesteps = sample_timesteps
        self.random_flip = random_flip
        self.epoch = 0

    def __call__(self, row: int, latent_shape: tuple[int, ...], images: int) -> dict:
        """The flip, ONE timestep and ONE noise for the row (shared by its images), one latent eps per image."""
        generator = row_generator(self.seed, int(row), self.epoch, _DRAW_STREAM)
        flip = bool(torch.rand((), generator=generator).item() < 0.5)  # always drawn: the stream stays fixed
        return {
            "flip": flip and self.random_flip,
            "timesteps": self.sample_timesteps(1, torch.device("cpu"), generator=generator)[0],
            "noise": torch.randn(latent_shape, generator=generator),
            "latent_eps": torch.randn((images, *latent_shape), generator=generator),
        }


class DrawEpochCallback(TrainerCallback):
    """Tells the draws which epoch the Trainer is in (read from its state, so a resumed run continues alike)."""

    def __init__(self, draws: RowDraws):
        self.draws = draws

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.draws.epoch = int(state.epoch or 0)


def reference_fingerprint(family, reference: torch.nn.Module, settings: list) -> str:
    """Everything a reference error depends on besides the cached latents: the reference's weights (its LoRA adapter,
    switched off for the reference, is ignored), the text encoders and tokenizers, the noise schedule and the
    training `settings` (seed, epochs, flip, precision, ...)."""
    tokenizers = [c for c in family.pipeline.components.values() if hasattr(c, "get_vocab")]
    schedule = {k: v for k, v in family.pipeline.scheduler.config.items() if not k.startswith("_")}  # not the path
    # The family's own scalar settings: prediction type, flow-matching timestep sampling, prompt length, ...
    family_settings = {k: v for k, v in vars(family).items()
                       if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    return Hasher.hash([
        CACHE_VERSION, "reference errors", type(family).__name__, family_settings, schedule,
        module_fingerprint(reference, ignore="lora_"),
        module_fingerprint(*family.text_encoders), [sorted(t.get_vocab().items()) for t in tokenizers], settings,
    ])


def precompute_reference_errors(
    dataset: datasets.Dataset, collator, errors, epochs: int, fingerprint: str, batch_size: int = 8
) -> datasets.Dataset:
    """Add the `ref_mse` column: for every epoch, the collator (with its `draws` set) builds the batch exactly as in
    training and `errors(batch)` returns the reference's per-image errors, shape (rows, images per row)."""
    draws = collator.draws
    images = len(collator.image_columns)
    torch_columns = [c for c in dataset.format["columns"] or dataset.column_names if c != REF_MSE]

    def compute(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        per_epoch = []
        for epoch in range(epochs):
            draws.epoch = epoch
            per_epoch.append(errors(collator(rows)).float().cpu())
        draws.epoch = 0
        return {REF_MSE: torch.stack(per_epoch, dim=1).numpy()}

    features = datasets.Features({**dataset.features, REF_MSE: datasets.Array2D((epochs, images), "float32")})
    with_errors = dataset.map(
        compute,
        batched=True,
        batch_size=batch_size,
        features=features,
        new_fingerprint=Hasher.hash([dataset._fingerprint, fingerprint, epochs]),
        desc="Computing the reference's errors",
    )
    return with_errors.with_format("torch", columns=[*torch_columns, REF_MSE], output_all_columns=True)
