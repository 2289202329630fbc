"""Tiny, randomly initialised, fully offline diffusers pipelines for tests.

Tests must exercise the real loading code (``DiffusionPipeline.from_pretrained``)
without network access, so every builder here constructs the smallest models
that still satisfy the shape contracts of the corresponding diffusers
pipeline, then writes them with ``save_pretrained``.

``sample_size`` arguments are pixel resolutions: each denoiser's config
``sample_size`` is set to ``sample_size // 2`` (all VAEs downsample 2x) so the
pipeline's default height/width equals ``sample_size``. FLUX is the exception:
its pipeline hard-codes the default resolution, so always pass height/width.
Any multiple of 4 px works for every pipeline (SD3 up to 128 px, the extent
of its positional-embedding table).

One module per model family (`testing/<family>.py`), each builder registered with `@tiny_builder("<PipelineClass>")`;
every module of this package is imported here, so a new builder is one new file.
"""

import importlib
import pkgutil

from .common import write_clip_tokenizer, write_t5_tokenizer
from .registry import TINY_BUILDERS, TINY_CALL_KWARGS, TINY_DATA, tiny_builder

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .distributed import allow_fsdp_on_cpu  # noqa: E402
from .fixtures import make_clip_model, make_preference_dataset  # noqa: E402
from .flux import make_flux_pipeline  # noqa: E402
from .flux2 import make_flux2_klein_pipeline, make_flux2_pipeline  # noqa: E402
from .rewards import (  # noqa: E402
    make_aesthetic_model,
    make_hps_model,
    make_hpsv3_model,
    make_imagereward_model,
    make_unifiedreward_model,
)
from .sd import make_sd_pipeline, make_sdxl_pipeline  # noqa: E402
from .sd3 import make_sd3_pipeline  # noqa: E402


def build_tiny_pipeline(pipeline_class_name: str, path, **kwargs) -> str:
    """Build and save the tiny pipeline of this class at `path`; returns the path."""
    if pipeline_class_name not in TINY_BUILDERS:
        raise KeyError(f"No tiny builder is registered for {pipeline_class_name}; registered: {sorted(TINY_BUILDERS)}.")
    return TINY_BUILDERS[pipeline_class_name](path, **kwargs)


__all__ = [
    "TINY_BUILDERS",
    "TINY_CALL_KWARGS",
    "TINY_DATA",
    "allow_fsdp_on_cpu",
    "build_tiny_pipeline",
    "make_aesthetic_model",
    "make_clip_model",
    "make_flux2_klein_pipeline",
    "make_flux2_pipeline",
    "make_flux_pipeline",
    "make_hps_model",
    "make_hpsv3_model",
    "make_imagereward_model",
    "make_preference_dataset",
    "make_sd3_pipeline",
    "make_sd_pipeline",
    "make_sdxl_pipeline",
    "make_unifiedreward_model",
    "tiny_builder",
    "write_clip_tokenizer",
    "write_t5_tokenizer",
]
