"""Finding the family of a pipeline, and the ONE pipeline loader of the package (trainer, sampling, AI feedback,
evaluation and the CLI all load through `load_pipeline` / `load_family`)."""

import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from ..quantization import pipeline_quantization_config
from .base import REGISTRY, DiffusionFamily


def family_class_for(pipeline_class_name: str) -> type[DiffusionFamily]:
    """The family that trains pipelines of this class, or a clear error listing the supported ones."""
    family = REGISTRY.get(pipeline_class_name)
    if family is None:
        raise ValueError(
            f"Pipeline class {pipeline_class_name!r} is not supported by DiffusionDPOTrainer; "
            f"supported pipeline classes: {', '.join(REGISTRY)}."
        )
    return family


def _resolve_dtypes(kwargs: dict | None) -> dict:
    """Accept dtype names as strings ("bfloat16"), as YAML and the command line give them."""
    kwargs = dict(kwargs or {})
    for key in ("torch_dtype", "dtype"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    return kwargs


def load_pipeline(model, init_kwargs: dict | None = None, require_family: bool = False) -> DiffusionPipeline:
    """`model` as given if it is a pipeline, else loaded (safetensors only) from a hub id or local path.

    The pipeline class is read from `model_index.json` before any weights load, so with `require_family` an
    unsupported model fails fast; a supported one is loaded with its family's `load_kwargs` (e.g. no SD1.5 safety
    checker). Sampling and evaluation accept any pipeline class (`require_family=False`); training does not.
    """
    if isinstance(model, DiffusionPipeline):
        if require_family:
            family_class_for(type(model).__name__)
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"`model` must be a hub id, a local path or a diffusers pipeline, got {type(model).__name__}.")
    kwargs = _resolve_dtypes(init_kwargs)
    if require_family:
        family = family_class_of(model, init_kwargs)
    else:
        family = REGISTRY.get(_pipeline_config(model, kwargs).get("_class_name"))
    load_kwargs = family.load_kwargs if family is not None else {}
    if kwargs.get("quantization_config") is not None:
        kwargs["quantization_config"] = pipeline_quantization_config(
            kwargs["quantization_config"], family.denoiser_name if family is not None else None
        )
    return DiffusionPipeline.from_pretrained(model, **{**load_kwargs, "use_safetensors": True, **kwargs})


def family_class_of(model: str | os.PathLike, init_kwargs: dict | None = None) -> type[DiffusionFamily]:
    """The family of the pipeline at a hub id or local path, from its `model_index.json` alone (no weights loaded),
    or a clear error: a cheap check to run before anything slow. The family may refuse the checkpoint from its
    config (`check_pipeline_config`, e.g. Wan 2.2's two experts)."""
    config = _pipeline_config(model, _resolve_dtypes(init_kwargs))
    family = family_class_for(config.get("_class_name", "<missing _class_name>"))
    family.check_pipeline_config(config)
    return family


def _pipeline_config(model: str | os.PathLike, kwargs: dict) -> dict:
    """The pipeline's `model_index.json`, read without loading weights."""
    _check_local_path(model)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    try:
        config = DiffusionPipeline.load_config(model, **hub_kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"Could not read a diffusers pipeline (model_index.json) from {str(model)!r}: {exc}") from exc
    return config


def _check_local_path(model) -> None:
    """A local path that is not a pipeline gets its own message, instead of the hub's 'could not connect'."""
    name, path = str(model), Path(model)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ValueError(f"{name!r} is a directory without a model_index.json: expected a diffusers pipeline saved "
                         "with `pipeline.save_pretrained(...)`, or a hub id such as stabilityai/stable-diffusion-xl-"
                         "base-1.0.")
    # Hub ids are `name` or `owner/name`: anything else that does not exist is a mistyped local path.
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise ValueError(f"{name!r} does not exist: expected a local directory with a model_index.json (a pipeline "
                         "saved with `save_pretrained`) or a hub id such as stabilityai/stable-diffusion-xl-base-1.0. "
                         "Check the path.")


def load_family(model, args=None) -> DiffusionFamily:
    """Load `model` (hub id, local path or a pipeline instance) and wrap it in its family.

    `args` is the `DiffusionDPOConfig`: `model_init_kwargs` go to `from_pretrained`, and the family reads its options
    from it. Only safetensors weights are accepted.
    """
    init_kwargs = args.model_init_kwargs if args is not None else None
    pipeline = load_pipeline(model, init_kwargs, require_family=True)
    return family_class_for(type(pipeline).__name__)(pipeline, args)
