"""The README.md written beside every saved model: what was trained, from what, how to reproduce it and load it."""

import os

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from . import losses

#: `datasets` builders for local files: the `dataset_name` of data they read, which names no dataset on the Hub.
LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text", "imagefolder", "videofolder", "audiofolder", "webdataset")

CITATION = """@inproceedings{wallace2024diffusion,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and
               Purushwalkam, Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024},
  eprint    = {2311.12908},
  archivePrefix = {arXiv}
}"""


def render_model_card(
    *,
    base_model: str | None,
    pipeline_class: str,
    denoiser_name: str,
    denoiser_class: str,
    is_lora: bool,
    loss_type,
    hyperparameters: dict,
    dataset: str | None = None,
    extra_tags: list[str] | None = None,
    video: bool = False,
) -> str:
    task = "text-to-video" if video else "text-to-image"
    tags = ["diffusion-dpo", "diffusers", task, *(["lora"] if is_lora else []), *(extra_tags or [])]
    hub_id = _hub_id(base_model)
    data = ModelCardData(
        base_model=hub_id,
        library_name="diffusers",
        pipeline_tag=task,
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset] if _hub_id(dataset) and dataset not in LOCAL_BUILDERS else None,
    )
    base = base_model or "<base model>"
    base_link = f"[{base}](https://huggingface.co/{base})" if hub_id else f"`{base}`"
    if is_lora:
        usage = (
            f"pipe = {pipeline_class}.from_pretrained({base!r})\n"
            "pipe.load_lora_weights(\"<this repo or folder>\")"
        )
        kind = f"a LoRA adapter for the {denoiser_name} of"
    else:
        usage = (
            f"{denoiser_name} = {denoiser_class}.from_pretrained(\"<this repo or folder>\", subfolder={denoiser_name!r})\n"
            f"pipe = {pipeline_class}.from_pretrained({base!r}, {denoiser_name}={denoiser_name})"
        )
        kind = f"a fully fine-tuned {denoiser_name} of"
    losses = loss_type if isinstance(loss_type, str) else " + ".join(loss_type)
    loss_line = f"`{losses}`"
    if "beta" in hyperparameters:
        loss_line += f", beta = {hyperparameters['beta']:g} (mean-reduced denoising error, logit factor -beta/2)"
    nft = loss_type == "nft"  # DiffusionNFT: rewards on the model's own samples, no preference pairs
    title = "DiffusionNFT fine-tune" if nft else "Diffusion-DPO fine-tune"
    how = ("trained on its own samples scored by reward functions with DiffusionNFT (arXiv 2509.16117)" if nft
           else "aligned to preference pairs with Diffusion-DPO")
    settings = "\n".join(f"- `{name}`: {_format(value)}" for name, value in hyperparameters.items())
    content = f"""---
{data.to_yaml()}
---

# {title}

This model is {kind} {base_link}, {how} using
[diffusion-dpo-trainer](https://pypi.org/project/diffusion-dpo-trainer/).

- Base model: `{base}`
- Dataset: {_describe_dataset(dataset)}
- Loss: {loss_line}

## Training hyper-parameters

{settings}

## Usage

```python
from diffusers import {pipeline_class}{"" if is_lora else ", " + denoiser_class}

{usage}
{'video = pipe("a cat walking in the snow").frames[0]' if video else
  'image = pipe("a photo of an astronaut riding a horse").images[0]'}
```

## Citation

```bibtex
{CITATION}
```
"""
    return str(ModelCard(content))


def _hub_id(model: str | None) -> str | None:
    """`model` if it names a Hub repository; a local folder must become neither card metadata nor a Hub link."""
    if not model or os.path.exists(model):
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    return model


def _describe_dataset(dataset: str | None) -> str:
    """A Hub dataset by its id (linked), local data by its path, or the `datasets` builder that read local files."""
    if not dataset:
        return "unspecified"
    if dataset in LOCAL_BUILDERS:
        return f"local {dataset} files (`datasets.load_dataset({dataset!r}, ...)`)"
    if _hub_id(dataset):
        return f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    return f"`{dataset}` (local)"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def card_hyperparameters(args, loss_types, loss_params, steps: int, resolution: int, mixed_precision: str,
                         lora_config=None, num_frames: int | None = None) -> dict:
    """What it takes to reproduce the run: the selected losses' own values, then the optimisation settings."""
    # A trainer with a loss of its own (GRPO, NFT) has no DPO loss parameters: it records its own.
    values = losses.loss_hyperparameters(loss_types, loss_params) if loss_params is not None else {}
    values.update({
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "optim": getattr(args.optim, "value", args.optim),
        # pairs (images for kto) per optimizer step, over all processes
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "steps": steps,
        "resolution": resolution,
        **({"num_frames": num_frames} if num_frames is not None else {}),
        "mixed_precision": mixed_precision,
        "seed": args.seed,
    })
    if args.proportion_empty_prompts:
        values["proportion_empty_prompts"] = args.proportion_empty_prompts
    for name in ("keep_ties", "curriculum_stages"):  # data-side stabilisers (the loss-side ones are loss values)
        if getattr(args, name, 1) not in (False, 1):
            values[name] = getattr(args, name)
    if lora_config is not None:
        values.update({"lora_rank": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                       "lora_target_modules": sorted(lora_config.target_modules)})
    return values
