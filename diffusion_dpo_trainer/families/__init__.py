"""Model families: everything that differs between SD1.x/2.x, SDXL, SD3 and FLUX lives here."""

import os

import torch
from diffusers import DiffusionPipeline

from .base import DiffusionFamily
from .flow import FlowMatchingFamily
from .flux import FluxFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily
from .wan import WanFamily

FAMILIES: tuple[type[DiffusionFamily], ...] = (
    StableDiffusionFamily,
    StableDiffusionXLFamily,
    StableDiffusion3Family,
    FluxFamily,
    WanFamily,
)


def family_class_for(pipeline_class_name: str) -> type[DiffusionFamily]:
    """The family that trains pipelines of this class, or a clear error listing the supported ones."""
    for family in FAMILIES:
        if pipeline_class_name in family.pipeline_class_names:
            return family
    supported = [name for family in FAMILIES for name in family.pipeline_class_names]
    raise ValueError(
        f"Pipeline class {pipeline_class_name!r} is not supported by DiffusionDPOTrainer; "
        f"supported pipeline classes: {', '.join(supported)}."
    )


def _resolve_dtypes(kwargs: dict) -> dict:
    """Accept dtype names as strings ("bfloat16"), as YAML and the command line give them."""
    kwargs = dict(kwargs or {})
    for key in ("torch_dtype", "dtype"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    return kwargs


def load_family(
    model, init_kwargs: dict | None = None, max_prompt_length: int | None = None, args=None
) -> DiffusionFamily:
    """Load `model` (hub id, local path or a pipeline instance) and wrap it in its family.

    The pipeline class is read from `model_index.json` before any weights are loaded, so an unsupported model fails
    fast. Only safetensors weights are accepted. `args` (a `DiffusionDPOConfig`) carries family options such as the
    flow-matching timestep sampling.
    """
    if isinstance(model, DiffusionPipeline):
        pipeline = model
    elif isinstance(model, (str, os.PathLike)):
        kwargs = _resolve_dtypes(init_kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        try:
            config = DiffusionPipeline.load_config(model, **hub_kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"Could not read a diffusers pipeline (model_index.json) from {str(model)!r}: {exc}"
            ) from exc
        family_class = family_class_for(config.get("_class_name", "<missing _class_name>"))
        family_class.check_pipeline_config(config)
        kwargs = {**family_class.load_kwargs, "use_safetensors": True, **kwargs}
        pipeline = DiffusionPipeline.from_pretrained(model, **kwargs)
    else:
        raise TypeError(
            f"`model` must be a hub id, a local path or a diffusers pipeline, got {type(model).__name__}."
        )
    return family_class_for(type(pipeline).__name__)(pipeline, max_prompt_length, args)


__all__ = [
    "FAMILIES",
    "DiffusionFamily",
    "FlowMatchingFamily",
    "FluxFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "WanFamily",
    "family_class_for",
    "load_family",
]
