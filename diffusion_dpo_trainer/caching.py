"""Precomputed VAE latents and prompt embeddings, stored with `datasets` so training never runs the frozen encoders.

Latents: the VAE's latent distribution (mean and std) of every image is stored, and the trainer samples from it at
every step exactly as it does from a fresh encode, so caching does not change the training distribution. Flips are
applied before encoding: with `random_flip` both orientations are cached and the collator draws the flip per row (a
pair, or one image of unpaired data) at train time, the same draw from the same generator as without caching. A
random crop cannot be cached for every position: with `random_crop` each row's crop is drawn ONCE at cache time
(seeded by the training seed and the row) and kept for every epoch.

Prompts: every distinct prompt is encoded once (Pick-a-Pic has several pairs per prompt) and looked up by the collator.

Both are `datasets.map` results with a fingerprint built from the data, the frozen modules' weights and the transform
settings, so a dataset on disk (from `load_dataset`/`load_from_disk`) reuses its cache across runs and processes.

The write side (`precompute_latents`, `precompute_prompt_embeddings`, `precompute_for_training`) and the read side
(`cached_images`, `PromptEmbeddingCache`, used by the collators) of the layout live here together. The write side
decodes rows with the training collator it is handed, so this module imports no collator (they import it).
"""

import contextlib
import hashlib
import os

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher

from .formats import ROW_COLUMN, eval_datasets, map_eval_datasets
from .transforms import flipped_crop_top_left

#: Bump when the stored layout changes, so old caches are not read.
CACHE_VERSION = 1
#: Columns a latent cache adds per side (`chosen_latent_mean`, ...); with flips also `*_flipped` variants.
LATENT_STATS = ("latent_mean", "latent_std")
FLIPPED = "_flipped"


def cached_images(row: dict, index: int, columns: tuple[str, ...], random_flip: bool, flip: bool | None = None) -> dict:
    """A cached row's latents per image column, with the row's flip drawn here (unless given): the same single draw as
    `paired_transform` makes without random crops (crops are fixed in the cache)."""
    if flip is None:
        flip = bool(random_flip and torch.rand(()).item() < 0.5)
    suffix = FLIPPED if flip else ""
    if flip and f"{columns[0]}_{LATENT_STATS[0]}{FLIPPED}" not in row:
        raise ValueError(
            f"Row {index}: random_flip is on but the cached latents have no flipped orientation; precompute them "
            "with random_flip=True."
        )
    return {
        side: {
            **{stat: row[f"{side}_{stat}{suffix}"] for stat in LATENT_STATS},
            "original_size": row[f"{side}_original_size"],
            "crop_top_left": row[f"{side}_crop_top_left{suffix}"],
        }
        for side in columns
    }


def module_fingerprint(*modules: torch.nn.Module, ignore: str | None = None) -> str:
    """Identity of frozen modules from their class, config, dtype and weights (the weights are hashed, not trusted
    by path: a fine-tuned VAE saved at the same path must not reuse the old cache). Tensors whose name contains
    `ignore` (e.g. "lora_": an adapter that is switched off) are left out."""
    identity, weights = [], hashlib.blake2b(digest_size=16)
    for module in modules:
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        identity.append([type(module).__name__, {k: v for k, v in config.items() if not k.startswith("_")}])
        for name, tensor in module.state_dict().items():
            if ignore and ignore in name:
                continue
            identity.append([name, str(tensor.dtype), tuple(tensor.shape)])
            weights.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return Hasher.hash([identity, weights.hexdigest()])


def _array_feature(shape: tuple[int, ...]):
    if len(shape) == 1:
        return datasets.List(datasets.Value("float32"), length=shape[0])
    array_types = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    return array_types[len(shape)](shape=shape, dtype="float32")


def derived_seed(*key: int) -> int:
    """A 32-bit seed from integers (e.g. run seed, row, epoch), independent for every distinct key.
    (SeedSequence ignores trailing zeros in its key: give each use a key that cannot end in one.)"""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def row_generator(seed: int, row: int, *key: int) -> torch.Generator:
    """An independent stream per (seed, row, *key), so a row's draws depend neither on batching nor on order."""
    return torch.Generator().manual_seed(derived_seed(seed, row, *key))


def precompute_latents(
    dataset: datasets.Dataset,
    family,
    collator,
    random_flip: bool = False,
    seed: int = 0,
    batch_size: int = 8,
) -> datasets.Dataset:
    """Replace the image columns by their VAE latent mean/std (and SDXL size/crop columns).

    Rows are decoded and transformed as the training `collator` transforms them (a `PreferenceCollator`, an
    `UnpairedCollator`, a video one: its `image_columns`, resolution and crop setting apply): the image columns of a
    row together, with one crop per row. Adds per column `{side}_latent_mean`, `{side}_latent_std`,
    `{side}_original_size`, `{side}_crop_top_left`, and with `random_flip` the same latents and crop for the flipped
    row (`*_flipped`). Returns the dataset in torch format.
    """
    image_columns, resolution, random_crop = collator.image_columns, collator.resolution, collator.random_crop
    orientations = ("", FLIPPED) if random_flip else ("",)
    latent_shape = family.latent_shape(collator.pixel_shape)
    size = datasets.List(datasets.Value("int64"), length=2)
    new_features = {}
    for side in image_columns:
        new_features[f"{side}_original_size"] = size
        for suffix in orientations:
            new_features.update({f"{side}_{stat}{suffix}": _array_feature(latent_shape) for stat in LATENT_STATS})
            new_features[f"{side}_crop_top_left{suffix}"] = size
    features = datasets.Features(
        {**{k: v for k, v in dataset.features.items() if k not in image_columns}, **new_features}
    )
    fingerprint = Hasher.hash(
        [CACHE_VERSION, "latents", dataset._fingerprint, module_fingerprint(family.vae), resolution, random_flip,
         random_crop and seed, collator.transform_settings]
    )

    def encode(batch):
        out = {key: [] for key in new_features if "latent" not in key}
        pixels = {side: [] for side in image_columns}
        for position, row in enumerate(batch[ROW_COLUMN]):
            generator = row_generator(seed, row) if random_crop else None
            values = {side: batch[side][position] for side in image_columns}
            for side, transformed in collator.transform(values, row, False, generator).items():
                original, crop = transformed["original_size"], transformed["crop_top_left"]
                pixels[side].append(transformed["pixel_values"])
                out[f"{side}_original_size"].append(original)
                out[f"{side}_crop_top_left"].append(crop)
                if random_flip:
                    out[f"{side}_crop_top_left{FLIPPED}"].append(flipped_crop_top_left(original, crop, resolution))
        upright = torch.cat([torch.stack(pixels[side]) for side in image_columns])
        # Flipping the cropped pixels equals cropping the flipped image at the mirrored position.
        stacked = torch.cat([upright, upright.flip(-1)]) if random_flip else upright
        stats = [s.cpu().numpy() for s in family.encode_pixels(stacked)]
        chunks = iter(np.split(np.stack(stats, axis=1), len(orientations) * len(image_columns)))
        for suffix in orientations:
            for side in image_columns:
                chunk = next(chunks)
                for index, stat in enumerate(LATENT_STATS):
                    out[f"{side}_{stat}{suffix}"] = chunk[:, index]
        return out

    cached = dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        remove_columns=list(image_columns),
        features=features,
        new_fingerprint=fingerprint,
        desc="Encoding images/videos with the VAE",
    )
    return cached.with_format("torch", columns=list(new_features), output_all_columns=True)


class PromptEmbeddingCache:
    """Embeddings of every distinct prompt (one row each), looked up by prompt when a batch is collated."""

    def __init__(self, embeddings: datasets.Dataset):
        self.keys = [c for c in embeddings.column_names if c != "prompt"]
        self.rows = {prompt: row for row, prompt in enumerate(embeddings["prompt"])}
        self.embeddings = embeddings.with_format("torch", columns=self.keys)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise ValueError(f"No precomputed embedding for prompt {missing[0]!r}: it was not in the cached datasets.")
        return self.embeddings[[self.rows[p] for p in prompts]]


def precompute_prompt_embeddings(
    datasets_to_encode: list[datasets.Dataset], family, device: torch.device, batch_size: int = 8, extra_prompts=()
) -> PromptEmbeddingCache:
    """Encode every distinct prompt of the datasets (and `extra_prompts`, e.g. the "" of prompt dropout) once with
    `family.encode_prompt`, keeping every tensor it returns.

    Stored next to the first on-disk dataset's cache files (reused across runs), in memory otherwise.
    """
    prompts = sorted({prompt for dataset in datasets_to_encode for prompt in dataset["prompt"]} | set(extra_prompts))
    encoders = family.text_encoders
    tokenizers = [c for c in family.pipeline.components.values() if hasattr(c, "get_vocab")]
    fingerprint = Hasher.hash(
        [CACHE_VERSION, "prompts", type(family).__name__, family.max_prompt_length, module_fingerprint(*encoders),
         [sorted(t.get_vocab().items()) for t in tokenizers], prompts]
    )
    cache_dirs = [os.path.dirname(f["filename"]) for dataset in datasets_to_encode for f in dataset.cache_files]
    cache_file = None
    if cache_dirs and datasets.is_caching_enabled():
        cache_file = os.path.join(cache_dirs[0], f"prompt-embeddings-{fingerprint}.arrow")
        if os.path.isfile(cache_file):
            return PromptEmbeddingCache(datasets.Dataset.from_file(cache_file))

    def encode(batch):
        return {k: v.float().cpu().numpy() for k, v in family.encode_prompt(batch["prompt"], device).items()}

    probe = family.encode_prompt(prompts[:1], device)  # the shapes, for Arrow's fixed-shape array types
    features = datasets.Features(
        {"prompt": datasets.Value("string"), **{k: _array_feature(tuple(v.shape[1:])) for k, v in probe.items()}}
    )
    embeddings = datasets.Dataset.from_dict({"prompt": prompts}).map(
        encode,
        batched=True,
        batch_size=batch_size,
        features=features,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        desc="Encoding prompts with the text encoders",
    )
    return PromptEmbeddingCache(embeddings)


def precompute_for_training(family, train_dataset, eval_dataset, collator, args, device):
    """What `DiffusionDPOTrainer` runs when `precompute_latents`/`precompute_text_embeddings` is set: encode every
    dataset once (main process first; `datasets` caches the result) and hand the prompt cache to the collator. Each
    encoder is on the accelerator only while it encodes, with the denoiser waiting on the CPU meanwhile; afterwards it
    goes back to the CPU or, with `release_cached_encoders`, is dropped. Returns the (train, eval) datasets with
    latents in place of images."""
    if not hasattr(collator, "image_columns"):
        raise TypeError("precompute_latents/precompute_text_embeddings need the default collator "
                        "(PreferenceCollator, or UnpairedCollator for kto).")
    if any(isinstance(d, datasets.IterableDataset) for d in (train_dataset, *eval_datasets(eval_dataset))):
        raise ValueError("precompute_latents/precompute_text_embeddings need a map-style datasets.Dataset: a "
                         "streamed dataset is read once per pass, so there is nothing to store and reuse.")
    with args.main_process_first(desc="precomputing latents and prompt embeddings"), _denoisers_aside(family):
        if args.precompute_latents:
            def encode(dataset, name=None):
                return precompute_latents(dataset, family, collator, args.random_flip, args.seed,
                                          args.per_device_train_batch_size)

            family.vae.to(device)
            train_dataset = None if train_dataset is None else encode(train_dataset)
            eval_dataset = map_eval_datasets(eval_dataset, encode)
            if args.release_cached_encoders:
                family.release(vae=True)
            else:
                family.vae.to("cpu")
        if args.precompute_text_embeddings:
            every = [d for d in (train_dataset, *eval_datasets(eval_dataset)) if d is not None]
            for encoder in family.text_encoders:
                encoder.to(device)
            # Prompt dropout turns prompts into "" at collate time, and a collator may name more (the negative of
            # guided sampling): their embeddings are cached too.
            extra = set(getattr(collator, "extra_prompts", ()))
            if getattr(collator, "proportion_empty_prompts", 0) > 0:
                extra.add("")
            collator.prompt_embeddings = precompute_prompt_embeddings(
                every, family, device, args.per_device_train_batch_size, extra_prompts=extra
            )
            if args.release_cached_encoders:
                family.release(text_encoders=True)
            else:
                for encoder in family.text_encoders:
                    encoder.to("cpu")
    return train_dataset, eval_dataset


@contextlib.contextmanager
def _denoisers_aside(family):
    """The denoiser and a frozen reference copy wait on the CPU, so an encoder never shares the accelerator with them
    (FLUX.2 [dev]: a 24B text encoder next to a 32B transformer); then they go back where they were."""
    modules = [m for m in (family.denoiser, family.ref_model) if m is not None]
    devices = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to("cpu")
    try:
        yield
    finally:
        for module, device in zip(modules, devices):
            module.to(device)
